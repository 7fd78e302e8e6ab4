"""lockstep's one Qwen3: the model (model.py), its TP layout (sharding.py), HF names (state_dict_adapter.py)."""

from .model import (
    AttnFactory,
    Qwen3Config,
    Qwen3Model,
    VarlenAttention,
    VarlenMeta,
    default_attn_factory,
    token_logprobs_packed,
)
from .sharding import tp_placements, tp_shard, tp_shard_dim
from .state_dict_adapter import from_hf, hf_state_dict, load_hf_weights, read_safetensors, titan_model_args, to_hf

__all__ = [
    "AttnFactory",
    "Qwen3Config",
    "Qwen3Model",
    "VarlenAttention",
    "VarlenMeta",
    "default_attn_factory",
    "from_hf",
    "hf_state_dict",
    "load_hf_weights",
    "read_safetensors",
    "titan_model_args",
    "to_hf",
    "token_logprobs_packed",
    "tp_placements",
    "tp_shard",
    "tp_shard_dim",
]
