"""q/k per-head RMSNorm + neox rope on NVIDIA GPUs, one launch (see lockstep/kernels/qk_norm_rope.py).

One program per (token, head) of q then k. A head row is read as its two rope halves; its sum
of squares is tl.sum(x1*x1) + tl.sum(x2*x2) (a fixed order that depends only on head_dim), then
y = x * rstd * weight rounded to the input dtype, then o1 = y1*cos - y2*sin, o2 = y2*cos + y1*sin
in fp32 from the cache row of the token's position. sqrt and divisions are correctly rounded.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _qk_norm_rope_kernel(q_ptr, k_ptr, qw_ptr, kw_ptr, qo_ptr, ko_ptr, pos_ptr, cache_ptr, eps, num_q_heads, num_kv_heads,
            stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
            HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    if head < num_q_heads:
        src = q_ptr + token * stride_qt + head * stride_qh
        w_ptr = qw_ptr
        dst = qo_ptr + (token * num_q_heads + head) * HEAD_DIM
    else:
        src = k_ptr + token * stride_kt + (head - num_q_heads) * stride_kh
        w_ptr = kw_ptr
        dst = ko_ptr + (token * num_kv_heads + head - num_q_heads) * HEAD_DIM
    offs = tl.arange(0, BLOCK)
    mask = offs < HALF
    x1 = tl.load(src + offs, mask=mask, other=0.0)
    x2 = tl.load(src + HALF + offs, mask=mask, other=0.0)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    sum_sq = tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(sum_sq, tl.full((), HEAD_DIM, tl.float32)) + eps))
    w1 = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    y1 = ((x1 * rstd) * w1).to(dtype).to(tl.float32)  # the norm's output, rounded as stored
    y2 = ((x2 * rstd) * w2).to(dtype).to(tl.float32)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    cos = tl.load(cache_ptr + pos * stride_cache + offs, mask=mask, other=0.0)
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + offs, mask=mask, other=0.0)
    tl.store(dst + offs, (y1 * cos - y2 * sin).to(dtype), mask=mask)
    tl.store(dst + HALF + offs, (y2 * cos + y1 * sin).to(dtype), mask=mask)


def qk_norm_rope_fwd(q, k, q_weight, k_weight, eps: float, positions, cos_sin_cache):
    """q [T, Hq, D], k [T, Hkv, D] (unit stride on D), weights [D], positions int [T],
    cos_sin_cache fp32 [P, D] -> (q_out [T, Hq, D], k_out [T, Hkv, D]) contiguous."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if q.dtype != k.dtype or head_dim % 2:
        raise ValueError(f"qk_norm_rope: q and k must share a dtype and an even head_dim, got {q.dtype}, {k.dtype}, {head_dim}")
    if cos_sin_cache.dtype != torch.float32 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("qk_norm_rope: cos_sin_cache must be a contiguous fp32 [P, D] (build it with rope_cache)")
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens:
        _qk_norm_rope_kernel[(num_tokens, num_q_heads + num_kv_heads)](
            q, k, q_weight.contiguous(), k_weight.contiguous(), q_out, k_out, positions.contiguous(), cos_sin_cache,
            float(eps), num_q_heads, num_kv_heads, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            cos_sin_cache.stride(0), HEAD_DIM=head_dim, HALF=head_dim // 2,
            BLOCK=max(16, triton.next_power_of_2(head_dim // 2)), num_warps=1)
    return q_out, k_out
