"""Batch-invariant, prefill/decode-invariant, TP-ready ops shared by trainer and generator.

Each op is a `torch.library.custom_op` in the `lockstep` namespace (CPU: the plain PyTorch
reference in its file; CUDA: `lockstep.kernels.triton`, see kernels/triton/README.md).
"""

from lockstep.kernels.activation import silu_mul
from lockstep.kernels.aten_override import disable, enable, invariant_mode, is_enabled
from lockstep.kernels.attention import attention_paged, attention_varlen
from lockstep.kernels.kv_cache import write_kv_cache
from lockstep.kernels.linear import TILE_K, linear, linear_group, linear_partial, tree_combine
from lockstep.kernels.logprobs import log_softmax, token_logprobs
from lockstep.kernels.qk_norm_rope import qk_norm_rope
from lockstep.kernels.rms_norm import add_rms_norm, rms_norm
from lockstep.kernels.rope import rope, rope_cache

__all__ = [
    "TILE_K",
    "add_rms_norm",
    "attention_paged",
    "attention_varlen",
    "disable",
    "enable",
    "invariant_mode",
    "is_enabled",
    "linear",
    "linear_group",
    "linear_partial",
    "log_softmax",
    "qk_norm_rope",
    "rms_norm",
    "rope",
    "rope_cache",
    "silu_mul",
    "token_logprobs",
    "tree_combine",
    "write_kv_cache",
]
