"""HF <-> lockstep parameter names, through TorchTitan's Qwen3 adapter.

lockstep's Qwen3 uses TorchTitan's module names, so TorchTitan's `Qwen3StateDictAdapter`
is the name table. Tied embeddings follow it too: `from_hf` fills `output.weight` from
`model.embed_tokens.weight` when the checkpoint has no lm_head, and `to_hf` leaves
`lm_head.weight` out. TorchTitan is imported lazily (it takes seconds).
"""

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from .model import Qwen3Config, Qwen3Model

# HF buffers some checkpoints carry that no model parameter matches.
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def titan_model_args(config: Qwen3Config):
    """TorchTitan's Qwen3ModelArgs for our config (its adapter and stock model read it)."""
    from torchtitan.models.qwen3.model.args import Qwen3ModelArgs

    return Qwen3ModelArgs(
        dim=config.hidden_size,
        n_layers=config.num_layers,
        n_heads=config.num_heads,
        n_kv_heads=config.num_kv_heads,
        vocab_size=config.vocab_size,
        head_dim=config.head_dim,
        hidden_dim=config.intermediate_size,
        norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        max_seq_len=config.max_position_embeddings,
        qk_norm=True,
        enable_weight_tying=config.tie_word_embeddings,
    )


def _adapter(config: Qwen3Config):
    from torchtitan.models.qwen3.model.state_dict_adapter import Qwen3StateDictAdapter

    return Qwen3StateDictAdapter(titan_model_args(config), hf_assets_path=None)


def to_hf(state_dict: dict[str, torch.Tensor], config: Qwen3Config) -> dict[str, torch.Tensor]:
    """lockstep/TorchTitan names -> HF names (tied: no lm_head.weight)."""
    return _adapter(config).to_hf(dict(state_dict))


def from_hf(hf_state_dict: dict[str, torch.Tensor], config: Qwen3Config) -> dict[str, torch.Tensor]:
    """HF names -> lockstep/TorchTitan names (tied: output.weight from the embedding)."""
    hf = {k: v for k, v in hf_state_dict.items() if not k.endswith(_IGNORED_HF_SUFFIXES)}
    try:
        return _adapter(config).from_hf(hf)  # it may add lm_head.weight: works on our copy
    except KeyError as e:
        raise ValueError(f"HF weight {e} has no Qwen3 counterpart: is this a dense Qwen3 checkpoint?") from None


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a HF checkpoint dir (model.safetensors or a sharded index), on CPU."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"no model.safetensors (or index) in {path}: pass a HF checkpoint dir")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(path / name, device="cpu"))
    return tensors


@torch.no_grad()
def load_hf_weights(model: Qwen3Model, path: str | os.PathLike) -> None:
    """Copy a HF checkpoint's weights into `model` (cast to its dtype, on its device)."""
    state_dict = from_hf(read_safetensors(path), model.config)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state_dict), set(state_dict) - expected
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match the model: missing {sorted(missing)[:4]}, "
            f"unexpected {sorted(unexpected)[:4]}; check config.json against the weights"
        )
    for name, param in model.state_dict().items():
        src = state_dict[name]
        if src.shape != param.shape:
            raise ValueError(f"{path}: {name} has shape {tuple(src.shape)}, the model wants {tuple(param.shape)}")
        param.copy_(src)


def hf_state_dict(model: Qwen3Model) -> dict[str, torch.Tensor]:
    """The model's weights under HF names (tensors share storage with the parameters)."""
    return to_hf(model.state_dict(), model.config)
