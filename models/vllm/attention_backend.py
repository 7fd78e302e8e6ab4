"""lockstep's paged attention as a vLLM v1 attention backend (vLLM 0.26 and 0.32).

vLLM keeps scheduling, block allocation and the KV cache tensors; this backend only
writes the new K/V into the cache and attends, both through `lockstep.kernels`
(`write_kv_cache`, `attention_paged`), so a query gets the same bits here as in the
trainer's varlen attention whatever the batch, chunking or decode step. Decode steps can run
as CUDA graphs (the builder's `_cudagraph_support`).

KV cache. vLLM hands each layer a tensor of logical shape [NB, Hkv, BS, 2 * D]; we ask for
the physical order [NB, BS, Hkv, 2 * D] (0.32: `supported_kv_cache_layouts`; 0.26:
`get_kv_cache_stride_order`). vLLM never reads our pages, so we give each page our own
meaning: its first half is the K block [BS, Hkv, D], its second half the V block. The
kernels get views k_cache, v_cache [NB, BS, Hkv, D], each block contiguous, block stride
2 * BS * Hkv * D.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)

BACKEND_NAME = "CUSTOM"  # the AttentionBackendEnum slot plugin.register() fills


class LockstepAttentionBackend(AttentionBackend):
    accept_output_buffer: bool = True
    # forward() writes the new K/V itself, right before attending.
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float32, torch.bfloat16, torch.float16]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float32", "bfloat16", "float16"]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type["LockstepAttentionImpl"]:
        return LockstepAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["LockstepAttentionMetadataBuilder"]:
        return LockstepAttentionMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        # 0.26 calls this with no argument, 0.32 with the layer's spec.
        return [MultipleOf(1)]

    # vLLM 0.26: logical shape and the physical permutation of it.
    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_size: int, cache_dtype_str: str = "auto"
    ) -> tuple[int, ...]:
        return (num_blocks, num_kv_heads, block_size, 2 * head_size)

    @staticmethod
    def get_kv_cache_stride_order(include_num_layers_dimension: bool = False) -> tuple[int, ...]:
        # [NB, BS, Hkv, 2D] in memory; with a layers dim, layers stay outermost.
        return (0, 1, 3, 2, 4) if include_num_layers_dimension else (0, 2, 1, 3)

    # vLLM 0.32: the same physical order, named as a layout ([L, B, N, H, C]).
    @classmethod
    def supported_kv_cache_layouts(cls):
        from vllm.v1.kv_cache_layout import KVCacheLayout

        return (KVCacheLayout.LBNHC,)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


@dataclass
class LockstepAttentionMetadata:
    """Per-step metadata of one KV cache group (shapes for B requests, T new tokens)."""

    num_actual_tokens: int  # T, the rows of q that are real (the rest is padding)
    query_start_loc: torch.Tensor  # int32 [B + 1], cu_seqlens of the new tokens
    seq_lens: torch.Tensor  # int32 [B], total length including the new tokens
    block_table: torch.Tensor  # int32 [B, max_blocks]
    slot_mapping: torch.Tensor  # int64 [T], block * BS + offset of each new token; < 0 skips


class LockstepAttentionMetadataBuilder(AttentionMetadataBuilder[LockstepAttentionMetadata]):
    # Decode batches replay captured CUDA graphs (vLLM's FULL_DECODE_ONLY): the kernels take
    # every size from tensor shapes, never sync with the host, and padded requests (no new
    # tokens, seq_len 0) and padded tokens (slot -1) are no-ops. Prefill and mixed batches run
    # eager, which keeps every captured graph a plain decode step.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> LockstepAttentionMetadata:
        cm = common_attn_metadata
        num_reqs, num_tokens = cm.num_reqs, cm.num_actual_tokens
        return LockstepAttentionMetadata(
            num_actual_tokens=num_tokens,
            query_start_loc=cm.query_start_loc[: num_reqs + 1],
            seq_lens=cm.seq_lens[:num_reqs],
            block_table=cm.block_table_tensor[:num_reqs],
            slot_mapping=cm.slot_mapping[:num_tokens],
        )


def split_kv_cache(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's layer cache (logical [NB, Hkv, BS, 2D]) -> k_cache, v_cache views [NB, BS, Hkv, D]."""
    num_blocks, num_kv_heads, block_size, content = kv_cache.shape
    page = block_size * num_kv_heads * content  # elements of one page: K block then V block
    expected = (num_kv_heads * content, content, 1)  # BS, Hkv, C strides inside a page
    got = (kv_cache.stride(2), kv_cache.stride(1), kv_cache.stride(3))
    if content != 2 * head_size or got != expected or kv_cache.stride(0) < page:
        raise RuntimeError(
            f"KV cache of shape {tuple(kv_cache.shape)} strides {kv_cache.stride()} is not laid out "
            f"[NB, BS, Hkv, 2*{head_size}]: unset VLLM_KV_CACHE_LAYOUT for lockstep runs"
        )
    half = page // 2
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    strides = (kv_cache.stride(0), num_kv_heads * head_size, head_size, 1)
    offset = kv_cache.storage_offset()
    k_cache = kv_cache.as_strided(shape, strides, offset)
    v_cache = kv_cache.as_strided(shape, strides, offset + half)
    return k_cache, v_cache


class LockstepAttentionImpl(AttentionImpl[LockstepAttentionMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **extra_impl_args,
    ) -> None:
        options = dict(
            alibi_slopes=alibi_slopes,
            sliding_window=sliding_window,
            logits_soft_cap=logits_soft_cap,
            kv_sharing_target_layer_name=kv_sharing_target_layer_name,
            **extra_impl_args,  # e.g. sinks; False/None mean "off"
        )
        for name, value in options.items():
            if value is not None and value is not False:
                raise ValueError(f"lockstep attention: {name}={value!r} is not supported; use model.impl=stock")
        if attn_type != AttentionType.DECODER:
            raise ValueError(f"lockstep attention: attn_type={attn_type!r}; only decoder attention is supported")
        if kv_cache_dtype not in LockstepAttentionBackend.supported_kv_cache_dtypes:
            raise ValueError(f"lockstep attention: kv_cache_dtype={kv_cache_dtype!r}; use 'auto' (the model dtype)")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None

    def forward(
        self,
        layer,
        query: torch.Tensor,  # [T, Hq, D]
        key: torch.Tensor,  # [T, Hkv, D]
        value: torch.Tensor,  # [T, Hkv, D]
        kv_cache: torch.Tensor,
        attn_metadata: LockstepAttentionMetadata | None,
        output: torch.Tensor,  # [T, Hq, D], written in place
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("lockstep attention: fused output quantization is not supported")
        if attn_metadata is None:  # profiling / warm-up run: no cache bound yet
            return output.zero_()
        from lockstep import kernels

        num_tokens = attn_metadata.num_actual_tokens
        k_cache, v_cache = split_kv_cache(kv_cache, self.head_size)
        kernels.write_kv_cache(
            key[:num_tokens], value[:num_tokens], k_cache, v_cache, attn_metadata.slot_mapping
        )
        # Padding tokens inside num_tokens (CUDA-graph batches) belong to no request and are not
        # written; vLLM drops their rows. Rows past num_tokens are zeroed (eager padding).
        kernels.attention_paged(
            query[:num_tokens],
            k_cache,
            v_cache,
            attn_metadata.block_table,
            attn_metadata.seq_lens,
            attn_metadata.query_start_loc,
            self.scale,
            out=output[:num_tokens],
        )
        output[num_tokens:].zero_()
        return output
