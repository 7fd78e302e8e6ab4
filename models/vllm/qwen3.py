"""`LockstepQwen3ForCausalLM`: lockstep's Qwen3 (`lockstep.models.qwen3.Qwen3Model`) as a vLLM model.

vLLM calls `forward` and `compute_logits`, which run our model, its fp32 `logits()` and our
log_softmax at the sampling temperature; the only vLLM piece inside is `PagedAttention`,
vLLM's `Attention` layer bound to our backend (attention_backend.py), so vLLM keeps
scheduling, the paged KV cache, continuous batching and sampling.

Tensor parallel (tensor_parallel_size > 1, one vLLM rank per Monarch proc through the
external launcher): the rank and group come from vLLM's parallel state, the model holds only
this rank's rows (models/qwen3/sharding.py) and runs parallelize.py's forwards over vLLM's
TP communicator (graph-capturable on GPU). `compute_logits` returns the full fp32 row on
every rank, so sampling and logprobs see what one rank would.
"""

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention

from lockstep import kernels
from lockstep.models.qwen3 import Qwen3Config, Qwen3Model, from_hf, tp_shard
from lockstep.models.qwen3.parallelize import local_shapes, parallelize, shard_parameters
from lockstep.models.qwen3.sharding import check_tp

from .plugin import backend_class

MODEL_PREFIX = "model"  # our Qwen3Model sits at `model.`; its parameters keep TorchTitan names


class PagedAttention(Attention):
    """Our model's inner attention inside vLLM: vLLM's Attention layer on our backend.

    `attn_meta` is ignored: vLLM passes the step's metadata through its forward context.
    """

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_meta=None) -> torch.Tensor:
        num_tokens = q.shape[0]
        out = super().forward(q, k, v)  # [T, Hq * D]
        return out.view(num_tokens, self.num_heads, self.head_size)


def qwen3_config(vllm_config: VllmConfig) -> Qwen3Config:
    """Our Qwen3Config from vLLM's HF config (whose architectures name our wrapper)."""
    hf = vllm_config.model_config.hf_config.to_dict()
    hf["architectures"] = ["Qwen3ForCausalLM"]
    return Qwen3Config.from_hf(hf)


class VllmTPComm:
    """vLLM's TP GroupCoordinator as parallelize.py's comm (its collectives are the ones vLLM
    captures in CUDA graphs)."""

    def __init__(self):
        from vllm.distributed import get_tp_group

        self.group = get_tp_group()
        self.rank, self.size = self.group.rank_in_group, self.group.world_size

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return self.group.all_gather(x.contiguous(), dim)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(x.clone())


class LockstepQwen3ForCausalLM(nn.Module):
    sampling_temperature = 1.0  # of compute_logits' log_softmax; see there

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        parallel = vllm_config.parallel_config
        if parallel.pipeline_parallel_size > 1:
            raise NotImplementedError("model.impl=lockstep inside vLLM has no pipeline parallelism: use tp and dp")
        self.config = qwen3_config(vllm_config)
        self.tp_size = parallel.tensor_parallel_size
        check_tp(self.config, self.tp_size, field="generator layout tp")
        self.comm = VllmTPComm() if self.tp_size > 1 else None
        self.tp_rank = self.comm.rank if self.comm else 0
        backend = backend_class()
        cache_config = vllm_config.cache_config
        model_prefix = f"{prefix}.{MODEL_PREFIX}" if prefix else MODEL_PREFIX
        device, dtype = torch.get_default_device(), torch.get_default_dtype()
        tp, num_kv = self.tp_size, self.config.num_kv_heads

        def attn_factory(layer_id: int, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
            with torch.device(device):  # outside the meta device the model is built under
                return PagedAttention(
                    num_heads=num_heads // tp,
                    head_size=head_dim,
                    scale=scale,
                    num_kv_heads=max(1, num_kv_heads // tp),  # tp > num_kv_heads: one KV head, replicated
                    cache_config=cache_config,
                    # The module's real path: vLLM finds layers and binds KV caches by it.
                    prefix=f"{model_prefix}.layers.{layer_id}.attention.inner_attention",
                    attn_backend=backend,
                )

        if tp == 1:
            self.model = Qwen3Model(self.config, attn_factory=attn_factory)
        else:
            # Built on meta, then only this rank's rows are allocated (weights come in load_weights).
            with torch.device("meta"):
                self.model = Qwen3Model(self.config, attn_factory=attn_factory)
            shard_parameters(self.model, self.tp_rank, tp, device, dtype)
            parallelize(self.model, self.comm)
        self.model.pack_projections()  # q/k/v and gate/up: one launch each

    def full_shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
        """TorchTitan name -> (full shape, offsets of this rank's block in it)."""
        full = local_shapes(self.config, 0, 1)
        mine = local_shapes(self.config, self.tp_rank, self.tp_size)
        return {name: (shape, (mine[name][1], *(0,) * (len(shape) - 1))) for name, (shape, _) in full.items()}

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.tok_embeddings(input_ids)

    def get_input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if intermediate_tensors is not None or inputs_embeds is not None:
            raise NotImplementedError("lockstep's Qwen3 in vLLM takes token ids only (no PP, no embeddings input)")
        return self.model(input_ids, positions, None)  # [T, H]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """log_softmax(logits / T), fp32 [T, V], T = `sampling_temperature`.

        vLLM samples from these at temperature 1 (the same distribution as logits at T) and,
        with logprobs_mode="processed_logits", returns the sampled token's entry: the logprob
        comes from our kernel, bit for bit what the trainer's token_logprobs computes; vLLM's
        softmax only draws the token (actors/vllm_engine.py)."""
        return kernels.log_softmax(self.model.logits(hidden_states), self.sampling_temperature)

    def set_sampling_temperature(self, temperature: float) -> None:
        """The temperature of the next requests (the generator sets it per call; vLLM gets 1)."""
        self.sampling_temperature = float(temperature)

    # -- weights ----------------------------------------------------------------------

    def native_parameters(self) -> dict[str, nn.Parameter]:
        """Our model's parameters by TorchTitan name (tied: `output.weight` is the embedding)."""
        return dict(self.model.named_parameters(remove_duplicate=False))

    @torch.no_grad()
    def load_native_state_dict(self, state_dict: dict[str, torch.Tensor]) -> set[str]:
        """Copy TorchTitan-named weights into the parameters in place; names must match exactly.

        Tensors that already are the parameter storage (an in-place pull) are not copied.
        """
        params = self.native_parameters()
        missing, unexpected = set(params) - set(state_dict), set(state_dict) - set(params)
        if missing or unexpected:
            raise ValueError(
                f"weights do not match lockstep's Qwen3: missing {sorted(missing)[:4]}, "
                f"unexpected {sorted(unexpected)[:4]}; push the trainer's full state dict"
            )
        for name, param in params.items():
            src = state_dict[name]
            if src.shape != param.shape and self.tp_size > 1:  # a full tensor: this rank's rows
                src = tp_shard(name, src, self.tp_rank, self.tp_size, self.config.num_kv_heads)
            if src.shape != param.shape:
                raise ValueError(f"weight {name} has shape {tuple(src.shape)}, the model wants {tuple(param.shape)}")
            if src.data_ptr() != param.data_ptr():
                param.copy_(src)
        return {f"{MODEL_PREFIX}.{name}" for name in params}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """vLLM's loader entry: HF-named weights -> our names (models/qwen3/state_dict_adapter.py)."""
        return self.load_native_state_dict(from_hf(dict(weights), self.config))
