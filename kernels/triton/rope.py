"""Neox (rotate-half) rotary embedding on NVIDIA GPUs, fp32 inside.

Elementwise per (token, head): o1 = x1*cos - x2*sin, o2 = x2*cos + x1*sin with cos/sin read
from the fp32 cache row of the token's absolute position. `inverse` negates sin (backward).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, out_ptr, token, num_heads, stride_xt, stride_xh, stride_ot, stride_oh, cos, sin,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    offs = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < num_heads) & (offs[None, :] < HALF)
    src = x_ptr + token * stride_xt + heads[:, None] * stride_xh + offs[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = out_ptr + token * stride_ot + heads[:, None] * stride_oh + offs[None, :]
    tl.store(dst, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, cache_ptr, num_q_heads, num_kv_heads,
                 stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
                 stride_cache, INVERSE: tl.constexpr, HALF: tl.constexpr,
                 BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    cmask = offs < HALF
    cos = tl.load(cache_ptr + pos * stride_cache + offs, mask=cmask, other=0.0)[None, :]
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + offs, mask=cmask, other=0.0)[None, :]
    if INVERSE:
        sin = -sin
    _rotate_heads(q_ptr, qo_ptr, token, num_q_heads, stride_qt, stride_qh, stride_qot, stride_qoh, cos, sin,
                  HALF, BLOCK_HQ, BLOCK_D)
    _rotate_heads(k_ptr, ko_ptr, token, num_kv_heads, stride_kt, stride_kh, stride_kot, stride_koh, cos, sin,
                  HALF, BLOCK_HK, BLOCK_D)


def rope_fwd(q, k, positions, cos_sin_cache, inverse: bool):
    """q [T, Hq, D], k [T, Hkv, D], positions int [T], cos_sin_cache fp32 [P, D] -> (q_rot, k_rot)."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[2] % 2:
        raise ValueError(f"rope: q [T, Hq, D] and k [T, Hkv, D] with even D expected, got {tuple(q.shape)}, {tuple(k.shape)}")
    if cos_sin_cache.dtype != torch.float32 or cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != q.shape[2]:
        raise ValueError(f"rope: cos_sin_cache must be fp32 [P, {q.shape[2]}] (build it with rope_cache)")
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    cache = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)
    num_tokens, num_q_heads, head_dim = q.shape
    if num_tokens:
        _rope_kernel[(num_tokens,)](
            q, k, q_out, k_out, positions.contiguous(), cache, num_q_heads, k.shape[1],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cache.stride(0),
            INVERSE=bool(inverse), HALF=head_dim // 2, BLOCK_HQ=triton.next_power_of_2(num_q_heads),
            BLOCK_HK=triton.next_power_of_2(k.shape[1]), BLOCK_D=triton.next_power_of_2(head_dim // 2), num_warps=4)
    return q_out, k_out
