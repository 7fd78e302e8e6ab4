"""Rotary position embedding, neox style (rotate half), as Qwen3 / HF use.

The cos/sin cache is built once by `rope_cache` (fp32 [max_positions, head_dim], cos in the
first half of each row, sin in the second) and indexed by absolute position, so a token's
rotation never depends on the batch. Backward is the inverse rotation.
"""

import torch
from torch import Tensor

from lockstep.kernels._dispatch import op, triton_fn

_ROWS_PER_BLOCK = 256


def rope_cache(head_dim: int, max_positions: int, base: float = 10000.0) -> Tensor:
    """fp32 [max_positions, head_dim]: [cos | sin] of pos * base**(-2i/head_dim), i < head_dim/2.

    Built on CPU in float64, in fixed blocks of rows, so row p has the same bits whatever
    max_positions is (SIMD vs scalar-tail cos would otherwise depend on the tensor size).
    Move it to the device afterwards.
    """
    if head_dim % 2 or head_dim <= 0:
        raise ValueError(f"rope_cache: head_dim must be even and positive, got {head_dim}")
    if max_positions <= 0:
        raise ValueError(f"rope_cache: max_positions must be positive, got {max_positions}")
    half = head_dim // 2
    inv_freq = torch.tensor([base ** (-2.0 * i / head_dim) for i in range(half)], dtype=torch.float64)
    num_blocks = -(-max_positions // _ROWS_PER_BLOCK)
    blocks = []
    for b in range(num_blocks):
        pos = torch.arange(b * _ROWS_PER_BLOCK, (b + 1) * _ROWS_PER_BLOCK, dtype=torch.float64)
        angle = pos[:, None] * inv_freq[None, :]  # [rows, half]
        blocks.append(torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1).float())
    return torch.cat(blocks)[:max_positions].contiguous()


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [T, H, D] fp32, cos/sin [T, 1, D/2] -> [T, H, D]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rope_reference(q: Tensor, k: Tensor, positions: Tensor, cos_sin_cache: Tensor, inverse: bool = False):
    """q [T, Hq, D], k [T, Hkv, D], positions int [T] -> (q_rot, k_rot) in the input dtypes."""
    half = q.shape[-1] // 2
    cs = cos_sin_cache.float()[positions.long()]  # [T, D]
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    if inverse:
        sin = -sin
    return _rotate(q.float(), cos, sin).to(q.dtype), _rotate(k.float(), cos, sin).to(k.dtype)


def _check(q: Tensor, k: Tensor, positions: Tensor, cache: Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"rope: q must be [T, Hq, D] and k [T, Hkv, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    if positions.shape != (q.shape[0],):
        raise ValueError(f"rope: positions must be [T={q.shape[0]}], got {tuple(positions.shape)}")
    if cache.dim() != 2 or cache.shape[1] != q.shape[-1]:
        raise ValueError(f"rope: cos_sin_cache must be [max_positions, {q.shape[-1]}] (build it with rope_cache)")
    if positions.device.type == "cpu" and positions.numel() and int(positions.max()) >= cache.shape[0]:
        top = int(positions.max())
        raise ValueError(f"rope: position {top} >= cache rows {cache.shape[0]}; build a larger rope_cache")


@op("rope", mutates_args=())
def _rope_op(q: Tensor, k: Tensor, positions: Tensor, cos_sin_cache: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
    _check(q, k, positions, cos_sin_cache)
    fn = triton_fn("rope", "rope_fwd") if q.is_cuda else None
    if fn is None:
        return rope_reference(q, k, positions, cos_sin_cache, inverse)
    return fn(q, k, positions, cos_sin_cache, inverse)


@_rope_op.register_fake
def _(q, k, positions, cos_sin_cache, inverse):
    return torch.empty_like(q), torch.empty_like(k)


def _setup(ctx, inputs, output):
    q, k, positions, cache, inverse = inputs
    ctx.save_for_backward(positions, cache)
    ctx.inverse = inverse
    ctx.like = (q.new_zeros(()).expand(q.shape), k.new_zeros(()).expand(k.shape))


def _backward(ctx, grad_q, grad_k):
    positions, cache = ctx.saved_tensors
    # An unused output gets no gradient: rotate zeros in its place.
    grad_q = grad_q if grad_q is not None else torch.zeros_like(ctx.like[0])
    grad_k = grad_k if grad_k is not None else torch.zeros_like(ctx.like[1])
    gq, gk = _rope_op(grad_q.contiguous(), grad_k.contiguous(), positions, cache, not ctx.inverse)
    return gq, gk, None, None, None


_rope_op.register_autograd(_backward, setup_context=_setup)


def rope(q: Tensor, k: Tensor, positions: Tensor, cos_sin_cache: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] by their positions [T]; returns new tensors."""
    return _rope_op(q, k, positions, cos_sin_cache, False)
