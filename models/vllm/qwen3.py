"""`LockstepQwen3ForCausalLM`: lockstep's Qwen3 (`lockstep.models.qwen3.Qwen3Model`) as a vLLM model.

The wrapper adds nothing numerical: vLLM calls `forward` and `compute_logits`, which run
our model and its fp32 `logits()`; the only vLLM piece inside is `PagedAttention`, vLLM's
`Attention` layer bound to our backend (attention_backend.py), so vLLM keeps scheduling,
the paged KV cache, continuous batching and sampling.
"""

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention

from lockstep.models.qwen3 import Qwen3Config, Qwen3Model, from_hf

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


class LockstepQwen3ForCausalLM(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        parallel = vllm_config.parallel_config
        if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
            raise NotImplementedError(
                "model.impl=lockstep inside vLLM does not support tensor/pipeline parallelism yet: "
                "use one GPU per generator replica, or model.impl=stock"
            )
        self.config = qwen3_config(vllm_config)
        backend = backend_class()
        cache_config = vllm_config.cache_config
        model_prefix = f"{prefix}.{MODEL_PREFIX}" if prefix else MODEL_PREFIX

        def attn_factory(layer_id: int, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
            return PagedAttention(
                num_heads=num_heads,
                head_size=head_dim,
                scale=scale,
                num_kv_heads=num_kv_heads,
                cache_config=cache_config,
                # The module's real path: vLLM finds layers and binds KV caches by it.
                prefix=f"{model_prefix}.layers.{layer_id}.attention.inner_attention",
                attn_backend=backend,
            )

        self.model = Qwen3Model(self.config, attn_factory=attn_factory)
        self.model.pack_projections()  # q/k/v and gate/up: one launch each

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
        return self.model.logits(hidden_states)  # fp32 [T, V]

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
            if src.shape != param.shape:
                raise ValueError(f"weight {name} has shape {tuple(src.shape)}, the model wants {tuple(param.shape)}")
            if src.data_ptr() != param.data_ptr():
                param.copy_(src)
        return {f"{MODEL_PREFIX}.{name}" for name in params}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """vLLM's loader entry: HF-named weights -> our names (models/qwen3/state_dict_adapter.py)."""
        return self.load_native_state_dict(from_hf(dict(weights), self.config))
