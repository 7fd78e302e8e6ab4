"""RMSNorm and fused residual-add + RMSNorm, fp32 inside.

y = x * rstd * weight, rstd = 1 / sqrt(sum(x*x) / H + eps); the sum over H runs in fixed
tiles (`_tree.tiled_sum`), sqrt and division are correctly rounded (no approximate rsqrt).
"""

import torch
from torch import Tensor

from lockstep.kernels._dispatch import op, triton_fn
from lockstep.kernels._tree import tiled_sum

TILE_H = 32


def _rstd(xf: Tensor, eps: float) -> Tensor:
    """xf [M, H] fp32 -> rstd [M, 1]."""
    mean_sq = tiled_sum(xf * xf, dim=-1, tile=TILE_H) / xf.shape[-1]
    return 1.0 / torch.sqrt(mean_sq + eps).unsqueeze(-1)


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x [..., H], weight [H] -> [..., H] in x's dtype."""
    xf = x.reshape(-1, x.shape[-1]).float()
    y = (xf * _rstd(xf, eps)) * weight.float()
    return y.to(x.dtype).reshape(x.shape)


def add_rms_norm_reference(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """new_residual = x + residual (fp32 add, rounded to x's dtype); y = rms_norm(new_residual)."""
    new_residual = (x.float() + residual.float()).to(x.dtype)
    return rms_norm_reference(new_residual, weight, eps), new_residual


def rms_norm_backward_reference(grad_y: Tensor, x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """-> (grad_x in x's dtype, grad_weight in weight's dtype); sums in fixed tiles."""
    xf = x.reshape(-1, x.shape[-1]).float()
    gw = grad_y.reshape(xf.shape).float() * weight.float()
    rstd = _rstd(xf, eps)
    x_hat = xf * rstd
    # d/dx of x * rstd: rstd * (g - x_hat * mean(g * x_hat)).
    mean_gx = (tiled_sum(gw * x_hat, dim=-1, tile=TILE_H) / xf.shape[-1]).unsqueeze(-1)
    grad_x = rstd * (gw - x_hat * mean_gx)
    grad_w = tiled_sum(grad_y.reshape(xf.shape).float() * x_hat, dim=0, tile=TILE_H)
    return grad_x.to(x.dtype).reshape(x.shape), grad_w.to(weight.dtype)


def _check(x: Tensor, weight: Tensor) -> None:
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight must be [{x.shape[-1]}] to match x [..., H], got {tuple(weight.shape)}")


@op("rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    _check(x, weight)
    fn = triton_fn("rms_norm", "rms_norm_fwd") if x.is_cuda else None
    if fn is None:
        return rms_norm_reference(x, weight, eps)
    return fn(x.reshape(-1, x.shape[-1]), weight, eps).reshape(x.shape)


@op("add_rms_norm", mutates_args=())
def _add_rms_norm_op(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    _check(x, weight)
    if residual.shape != x.shape:
        raise ValueError(f"add_rms_norm: residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    fn = triton_fn("rms_norm", "add_rms_norm_fwd") if x.is_cuda else None
    if fn is None:
        return add_rms_norm_reference(x, residual, weight, eps)
    h = x.shape[-1]
    y, new_residual = fn(x.reshape(-1, h), residual.reshape(-1, h), weight, eps)
    return y.reshape(x.shape), new_residual.reshape(x.shape)


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


@op("rms_norm_backward", mutates_args=())
def _norm_grads(grad_y: Tensor, x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    fn = triton_fn("rms_norm", "rms_norm_bwd") if x.is_cuda else None
    if fn is None:
        return rms_norm_backward_reference(grad_y, x, weight, eps)
    h = x.shape[-1]
    grad_x, grad_w = fn(grad_y.reshape(-1, h), x.reshape(-1, h), weight, eps)
    return grad_x.reshape(x.shape), grad_w


@_norm_grads.register_fake
def _(grad_y, x, weight, eps):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup_norm(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _norm_backward(ctx, grad_y):
    x, weight = ctx.saved_tensors
    grad_x, grad_w = _norm_grads(grad_y, x, weight, ctx.eps)
    return grad_x, grad_w, None


def _setup_add_norm(ctx, inputs, output):
    x, residual, weight, eps = inputs
    ctx.save_for_backward(output[1], weight)
    ctx.eps = eps
    ctx.residual_dtype = residual.dtype


def _add_norm_backward(ctx, grad_y, grad_residual):
    new_residual, weight = ctx.saved_tensors
    grad_sum, grad_w = _norm_grads(grad_y, new_residual, weight, ctx.eps)
    if grad_residual is not None:
        grad_sum = (grad_sum.float() + grad_residual.float()).to(new_residual.dtype)
    return grad_sum, grad_sum.to(ctx.residual_dtype), grad_w, None


_rms_norm_op.register_autograd(_norm_backward, setup_context=_setup_norm)
_add_rms_norm_op.register_autograd(_add_norm_backward, setup_context=_setup_add_norm)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x [..., H], weight [H] -> [..., H] in x's dtype."""
    return _rms_norm_op(x, weight, eps)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """-> (rms_norm(x + residual), x + residual); the sum is rounded to x's dtype first."""
    return _add_rms_norm_op(x, residual, weight, eps)
