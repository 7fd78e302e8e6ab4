"""SiLU-and-multiply for the gated MLP: gate_up [..., 2I] -> silu(gate) * up [..., I].

Gate is the first half, up the second (vLLM's layout). fp32 inside; sigmoid through
`_math.det_exp` so every element takes the same steps.
"""

import torch
from torch import Tensor

from lockstep.kernels._dispatch import op, triton_fn
from lockstep.kernels._math import det_exp


def _sigmoid(g: Tensor) -> Tensor:
    e = det_exp(-g.abs())  # in (0, 1], never overflows
    return torch.where(g >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def silu_mul_reference(gate_up: Tensor) -> Tensor:
    inter = gate_up.shape[-1] // 2
    gate, up = gate_up[..., :inter].float(), gate_up[..., inter:].float()
    return ((gate * _sigmoid(gate)) * up).to(gate_up.dtype)


def silu_mul_backward_reference(grad: Tensor, gate_up: Tensor) -> Tensor:
    """grad [..., I], gate_up [..., 2I] -> grad_gate_up [..., 2I] in gate_up's dtype."""
    inter = gate_up.shape[-1] // 2
    gate, up = gate_up[..., :inter].float(), gate_up[..., inter:].float()
    g = grad.float()
    sig = _sigmoid(gate)
    silu = gate * sig
    dsilu = sig * (1.0 + gate * (1.0 - sig))
    return torch.cat([(g * up) * dsilu, g * silu], dim=-1).to(gate_up.dtype)


def _check(gate_up: Tensor) -> None:
    if gate_up.shape[-1] % 2:
        raise ValueError(f"silu_mul: last dim of gate_up must be even (gate | up), got {gate_up.shape[-1]}")


@op("silu_mul", mutates_args=())
def _silu_mul_op(gate_up: Tensor) -> Tensor:
    _check(gate_up)
    fn = triton_fn("activation", "silu_mul_fwd") if gate_up.is_cuda else None
    if fn is None:
        return silu_mul_reference(gate_up)
    out = fn(gate_up.reshape(-1, gate_up.shape[-1]))
    return out.reshape(*gate_up.shape[:-1], gate_up.shape[-1] // 2)


@_silu_mul_op.register_fake
def _(gate_up):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


@op("silu_mul_backward", mutates_args=())
def _silu_mul_backward_op(grad: Tensor, gate_up: Tensor) -> Tensor:
    fn = triton_fn("activation", "silu_mul_bwd") if gate_up.is_cuda else None
    if fn is None:
        return silu_mul_backward_reference(grad, gate_up)
    width = gate_up.shape[-1]
    return fn(grad.reshape(-1, width // 2), gate_up.reshape(-1, width)).reshape(gate_up.shape)


@_silu_mul_backward_op.register_fake
def _(grad, gate_up):
    return torch.empty_like(gate_up)


def _backward(ctx, grad):
    (gate_up,) = ctx.saved_tensors
    return _silu_mul_backward_op(grad, gate_up)


_silu_mul_op.register_autograd(_backward, setup_context=_setup)


def silu_mul(gate_up: Tensor) -> Tensor:
    """gate_up [..., 2I] -> silu(gate_up[..., :I]) * gate_up[..., I:]  [..., I]."""
    return _silu_mul_op(gate_up)
