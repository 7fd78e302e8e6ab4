"""SiLU-and-multiply on NVIDIA GPUs: gate_up [M, 2I] -> silu(gate) * up [M, I], fp32 inside.

Elementwise, so no element depends on any other; sigmoid is written as in the CPU reference
(exp of -|g| only, so it never overflows) with correctly rounded divisions.
"""

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _sigmoid(g):
    e = tl.exp(-tl.abs(g))
    one_plus = 1.0 + e
    return tl.where(g >= 0, tl.div_rn(tl.full(g.shape, 1.0, tl.float32), one_plus), tl.div_rn(e, one_plus))


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, inter, stride_gu, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    g = tl.load(gu_ptr + row * stride_gu + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + inter + offs, mask=mask, other=0.0).to(tl.float32)
    y = (g * _sigmoid(g)) * u
    tl.store(out_ptr + row * stride_out + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(grad_ptr, gu_ptr, out_ptr, inter, stride_grad, stride_gu, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    g = tl.load(gu_ptr + row * stride_gu + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + inter + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(grad_ptr + row * stride_grad + offs, mask=mask, other=0.0).to(tl.float32)
    sig = _sigmoid(g)
    dsilu = sig * (1.0 + g * (1.0 - sig))
    out_row = out_ptr + row * stride_out
    tl.store(out_row + offs, ((dy * u) * dsilu).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_row + inter + offs, (dy * (g * sig)).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def silu_mul_fwd(gate_up2d: torch.Tensor) -> torch.Tensor:
    """[M, 2I] (gate | up) -> [M, I] in the input dtype."""
    if gate_up2d.dim() != 2 or gate_up2d.shape[1] % 2:
        raise ValueError(f"silu_mul: gate_up2d must be [M, 2I], got {tuple(gate_up2d.shape)}")
    gate_up2d = _rows(gate_up2d)
    M, inter = gate_up2d.shape[0], gate_up2d.shape[1] // 2
    out = torch.empty((M, inter), dtype=gate_up2d.dtype, device=gate_up2d.device)
    if M and inter:
        _silu_mul_kernel[(M, triton.cdiv(inter, _BLOCK))](gate_up2d, out, inter, gate_up2d.stride(0), out.stride(0),
                                                     BLOCK=_BLOCK, num_warps=4)
    return out


def silu_mul_bwd(grad2d: torch.Tensor, gate_up2d: torch.Tensor) -> torch.Tensor:
    """grad [M, I], gate_up [M, 2I] -> grad_gate_up [M, 2I] in gate_up's dtype."""
    if gate_up2d.dim() != 2 or grad2d.shape != (gate_up2d.shape[0], gate_up2d.shape[1] // 2):
        raise ValueError(f"silu_mul_bwd: grad [M, I] and gate_up [M, 2I] expected, got {tuple(grad2d.shape)}, {tuple(gate_up2d.shape)}")
    grad2d, gate_up2d = _rows(grad2d), _rows(gate_up2d)
    M, inter = grad2d.shape
    out = torch.empty(gate_up2d.shape, dtype=gate_up2d.dtype, device=gate_up2d.device)
    if M and inter:
        _bwd_kernel[(M, triton.cdiv(inter, _BLOCK))](grad2d, gate_up2d, out, inter, grad2d.stride(0),
                                                     gate_up2d.stride(0), out.stride(0), BLOCK=_BLOCK, num_warps=4)
    return out
