"""Per-head RMSNorm of q and k, then rope: Qwen3's q_norm / k_norm and rotary embedding, one op.

    q_out, k_out = rope(rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps), positions)

The norm's output is rounded to q's dtype before the rotation, as the two ops would. q and k
may be strided views of one qkv projection (unit stride on D); the outputs are new contiguous
tensors. CPU runs the two references in turn; CUDA runs one kernel (one program per (token,
head)) whose sum of squares is its own fixed order, the same in every batch and layout.
Backward: the inverse rotation, then the RMSNorm backward.
"""

import torch
from torch import Tensor

from lockstep.kernels._dispatch import op, triton_fn
from lockstep.kernels.rms_norm import _norm_grads, rms_norm_reference
from lockstep.kernels.rope import _check as _check_rope
from lockstep.kernels.rope import _rope_op, rope_reference


def qk_norm_rope_reference(q, k, q_weight, k_weight, eps: float, positions, cos_sin_cache):
    """q [T, Hq, D], k [T, Hkv, D], weights [D] -> (q_out, k_out) in the input dtypes."""
    return rope_reference(rms_norm_reference(q, q_weight, eps), rms_norm_reference(k, k_weight, eps),
                          positions, cos_sin_cache)


def _check(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor) -> None:
    head_dim = q.shape[-1]
    if q.dim() != 3 or k.dim() != 3 or k.shape[-1] != head_dim:
        raise ValueError(f"qk_norm_rope: q [T, Hq, D] and k [T, Hkv, D] expected, got {tuple(q.shape)}, {tuple(k.shape)}")
    if q_weight.shape != (head_dim,) or k_weight.shape != (head_dim,):
        raise ValueError(f"qk_norm_rope: q/k norm weights must be [{head_dim}], got "
                         f"{tuple(q_weight.shape)} and {tuple(k_weight.shape)}")


@op("qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, eps: float, positions: Tensor,
                     cos_sin_cache: Tensor) -> tuple[Tensor, Tensor]:
    _check(q, k, q_weight, k_weight)
    _check_rope(q, k, positions, cos_sin_cache)
    fn = triton_fn("qk_norm_rope", "qk_norm_rope_fwd") if q.is_cuda else None
    if fn is None:
        return qk_norm_rope_reference(q, k, q_weight, k_weight, eps, positions, cos_sin_cache)
    return fn(q, k, q_weight, k_weight, eps, positions, cos_sin_cache)


@_qk_norm_rope_op.register_fake
def _(q, k, q_weight, k_weight, eps, positions, cos_sin_cache):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _setup(ctx, inputs, output):
    q, k, q_weight, k_weight, eps, positions, cache = inputs
    ctx.save_for_backward(q, k, q_weight, k_weight, positions, cache)
    ctx.eps = eps


def _backward(ctx, grad_q, grad_k):
    q, k, q_weight, k_weight, positions, cache = ctx.saved_tensors
    grad_q = grad_q if grad_q is not None else q.new_zeros(q.shape)  # an unused output gets no grad
    grad_k = grad_k if grad_k is not None else k.new_zeros(k.shape)
    gq, gk = _rope_op(grad_q.contiguous(), grad_k.contiguous(), positions, cache, True)  # the inverse rotation
    grad_q, grad_qw = _norm_grads(gq, q.contiguous(), q_weight, ctx.eps)
    grad_k, grad_kw = _norm_grads(gk, k.contiguous(), k_weight, ctx.eps)
    return grad_q, grad_k, grad_qw, grad_kw, None, None, None


_qk_norm_rope_op.register_autograd(_backward, setup_context=_setup)


def qk_norm_rope(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, eps: float, positions: Tensor,
                 cos_sin_cache: Tensor) -> tuple[Tensor, Tensor]:
    """rope(rms_norm(q, q_weight), rms_norm(k, k_weight)) by positions [T]; new contiguous tensors."""
    return _qk_norm_rope_op(q, k, q_weight, k_weight, float(eps), positions, cos_sin_cache)
