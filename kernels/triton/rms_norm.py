"""RMSNorm and residual-add + RMSNorm on NVIDIA GPUs, fp32 inside.

One program per row; a row's sum of squares is one `tl.sum` over a block whose shape depends
only on H, so a row's bits never depend on how many rows there are. sqrt and the divisions are
correctly rounded (`sqrt_rn`, `div_rn`), as the CPU reference's.
Backward: grad_x per row; grad_weight summed over fixed chunks of rows, then over the chunks in
order (no atomics: two runs give the same bits).
"""

import torch
import triton
import triton.language as tl

_MAX_H = 65536
_ROWS_PER_CHUNK = 64  # grad_weight: rows one program folds before the chunk sum


def _block_h(h: int) -> tuple[int, int]:
    if h > _MAX_H:
        raise ValueError(f"rms_norm: hidden size {h} > {_MAX_H} is not supported by the Triton kernel")
    block = triton.next_power_of_2(h)
    return block, min(16, max(1, block // 256))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D view with unit stride along H (copies only if needed)."""
    return t if t.stride(-1) == 1 else t.contiguous()


@triton.jit
def _rstd(xf, H, eps):
    mean_sq = tl.div_rn(tl.sum(xf * xf, axis=0), tl.full((), H, tl.float32))
    return tl.div_rn(1.0, tl.sqrt_rn(mean_sq + eps))


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, new_res_ptr, H: tl.constexpr, eps,
                stride_x, stride_r, stride_y, stride_nr,
                HAS_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < H
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:  # the norm reads the residual sum rounded to x's dtype
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(new_res_ptr + row * stride_nr + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = _rstd(xf, H, eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, ((xf * rstd) * w).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(g_ptr, x_ptr, w_ptr, gx_ptr, gw_part_ptr, M, H: tl.constexpr, eps, stride_g, stride_x, stride_gx,
                ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
    chunk = tl.program_id(0)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < H
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gw_acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for i in range(ROWS):
        row = chunk.to(tl.int64) * ROWS + i
        if row < M:
            xf = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
            rstd = _rstd(xf, H, eps)
            x_hat = xf * rstd
            gw = g * w
            mean_gx = tl.div_rn(tl.sum(gw * x_hat, axis=0), tl.full((), H, tl.float32))
            gx = rstd * (gw - x_hat * mean_gx)
            tl.store(gx_ptr + row * stride_gx + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
            gw_acc += g * x_hat
    tl.store(gw_part_ptr + chunk.to(tl.int64) * H + offs, gw_acc, mask=mask)


@triton.jit
def _chunk_sum_kernel(part_ptr, out_ptr, num_chunks, H, BLOCK: tl.constexpr):
    # part [num_chunks, H] fp32 -> out [H]: chunks added in order.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < H
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(num_chunks):
        acc += tl.load(part_ptr + c * H + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _check(x2d: torch.Tensor, weight: torch.Tensor) -> None:
    if x2d.dim() != 2 or weight.shape != (x2d.shape[1],):
        raise ValueError(f"rms_norm: x2d [M, H] and weight [H] expected, got {tuple(x2d.shape)} and {tuple(weight.shape)}")


def rms_norm_fwd(x2d: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x2d [M, H], weight [H] -> y [M, H] in x2d's dtype."""
    _check(x2d, weight)
    x2d, weight = _rows(x2d), weight.contiguous()
    y = torch.empty(x2d.shape, dtype=x2d.dtype, device=x2d.device)
    if x2d.shape[0]:
        block, warps = _block_h(x2d.shape[1])
        _rms_norm_kernel[(x2d.shape[0],)](x2d, x2d, weight, y, y, x2d.shape[1], eps,
                                     x2d.stride(0), 0, y.stride(0), 0,
                                     HAS_RESIDUAL=False, BLOCK_H=block, num_warps=warps)
    return y


def add_rms_norm_fwd(x2d, residual2d, weight, eps: float):
    """-> (rms_norm(new_residual), new_residual), new_residual = (x + residual) rounded to x's dtype."""
    _check(x2d, weight)
    if residual2d.shape != x2d.shape:
        raise ValueError(f"add_rms_norm: residual {tuple(residual2d.shape)} must match x {tuple(x2d.shape)}")
    x2d, residual2d, weight = _rows(x2d), _rows(residual2d), weight.contiguous()
    y = torch.empty(x2d.shape, dtype=x2d.dtype, device=x2d.device)
    new_res = torch.empty_like(y)
    if x2d.shape[0]:
        block, warps = _block_h(x2d.shape[1])
        _rms_norm_kernel[(x2d.shape[0],)](x2d, residual2d, weight, y, new_res, x2d.shape[1], eps,
                                     x2d.stride(0), residual2d.stride(0), y.stride(0), new_res.stride(0),
                                     HAS_RESIDUAL=True, BLOCK_H=block, num_warps=warps)
    return y, new_res


def rms_norm_bwd(grad_y2d, x2d, weight, eps: float):
    """-> (grad_x [M, H] in x's dtype, grad_weight [H] in weight's dtype)."""
    _check(x2d, weight)
    grad_y2d, x2d, weight = _rows(grad_y2d), _rows(x2d), weight.contiguous()
    M, H = x2d.shape
    grad_x = torch.empty(x2d.shape, dtype=x2d.dtype, device=x2d.device)
    grad_w = torch.empty(H, dtype=weight.dtype, device=x2d.device)
    num_chunks = max(1, triton.cdiv(M, _ROWS_PER_CHUNK))
    part = torch.zeros((num_chunks, H), dtype=torch.float32, device=x2d.device)
    block, warps = _block_h(H)
    if M:
        _bwd_kernel[(num_chunks,)](grad_y2d, x2d, weight, grad_x, part, M, H, eps,
                                   grad_y2d.stride(0), x2d.stride(0), grad_x.stride(0),
                                   ROWS=_ROWS_PER_CHUNK, BLOCK_H=block, num_warps=warps)
    _chunk_sum_kernel[(triton.cdiv(H, 1024),)](part, grad_w, num_chunks, H, BLOCK=1024, num_warps=4)
    return grad_x, grad_w
