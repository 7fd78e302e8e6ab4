"""silu_mul: batch invariance, accuracy, gradients."""

import torch
from hypothesis import given, settings, strategies as st

from lockstep.kernels import silu_mul

SETTINGS = settings(max_examples=25, deadline=None)


def _ref64(gate_up):
    gate, up = gate_up.double().chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@SETTINGS
@given(
    m=st.integers(1, 64),
    inter=st.integers(1, 200),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_rows_are_batch_invariant(m, inter, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(m, 2 * inter, generator=g) * 4).to(dtype)
    out = silu_mul(gate_up)
    assert out.shape == (m, inter) and out.dtype == dtype
    i = seed % m
    assert torch.equal(silu_mul(gate_up[i : i + 1]), out[i : i + 1])
    perm = torch.randperm(m, generator=g)
    assert torch.equal(silu_mul(gate_up[perm]), out[perm])


def test_accuracy_against_float64():
    gate_up = torch.randn(64, 512) * 8
    ref = _ref64(gate_up)
    # A few fp32 roundings (sigmoid, two products): 8 ulp relative, plus tiny absolute.
    assert ((silu_mul(gate_up).double() - ref).abs() <= 8 * 2**-24 * ref.abs() + 1e-30).all()
    extreme = torch.tensor([[-200.0, 200.0, 0.0, 1.0, 1.0, 1.0]])
    assert torch.equal(silu_mul(extreme), torch.tensor([[-0.0, 200.0, 0.0]]))


def test_gradients_against_float64():
    gate_up = (torch.randn(9, 80) * 3).requires_grad_()
    grad = torch.randn(9, 40)
    (silu_mul(gate_up) * grad).sum().backward()
    gu64 = gate_up.detach().double().requires_grad_()
    (_ref64(gu64) * grad.double()).sum().backward()
    torch.testing.assert_close(gate_up.grad.double(), gu64.grad, rtol=1e-5, atol=1e-6)


def test_opcheck():
    torch.library.opcheck(torch.ops.lockstep.silu_mul, (torch.randn(3, 10, requires_grad=True),))
