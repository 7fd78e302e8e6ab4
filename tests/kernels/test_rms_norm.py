"""rms_norm / add_rms_norm: batch invariance, accuracy, gradients."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lockstep.kernels import add_rms_norm, rms_norm

SETTINGS = settings(max_examples=25, deadline=None)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = 1e-6


def _ref64(x, w, eps=EPS):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@SETTINGS
@given(m=st.integers(1, 64), h=st.integers(1, 300), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_rows_are_batch_invariant(m, h, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, h, generator=g).to(dtype)
    r = torch.randn(m, h, generator=g).to(dtype)
    w = torch.randn(h, generator=g).to(dtype)
    y = rms_norm(x, w, EPS)
    y2, res = add_rms_norm(x, r, w, EPS)
    i = seed % m
    perm = torch.randperm(m, generator=g)
    assert torch.equal(rms_norm(x[i : i + 1], w, EPS), y[i : i + 1])
    assert torch.equal(rms_norm(x[perm], w, EPS), y[perm])
    yi, ri = add_rms_norm(x[perm], r[perm], w, EPS)
    assert torch.equal(yi, y2[perm]) and torch.equal(ri, res[perm])
    # add_rms_norm == add (rounded to x's dtype) then rms_norm, bit for bit.
    assert torch.equal(res, (x.float() + r.float()).to(dtype))
    assert torch.equal(y2, rms_norm(res, w, EPS))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 4e-6), (torch.bfloat16, 2**-8)])
def test_accuracy_against_float64(dtype, tol):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(50, 200, generator=g) * 3).to(dtype)
    w = torch.randn(200, generator=g).to(dtype)
    ref = _ref64(x, w)
    # fp32 math inside; the stated bound is relative to |ref| plus one rounding to dtype.
    err = (rms_norm(x, w, EPS).double() - ref).abs()
    assert (err <= tol * ref.abs() + 1e-30).all(), err.max()


def test_gradients_against_float64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(17, 96, generator=g, requires_grad=True)
    r = torch.randn(17, 96, generator=g, requires_grad=True)
    w = torch.randn(96, generator=g, requires_grad=True)
    gy, gres = torch.randn(17, 96, generator=g), torch.randn(17, 96, generator=g)
    y, res = add_rms_norm(x, r, w, EPS)
    ((y * gy).sum() + (res * gres).sum()).backward()
    x64, r64, w64 = (t.detach().double().requires_grad_() for t in (x, r, w))
    res64 = x64 + r64
    ((_ref64(res64, w64) * gy.double()).sum() + (res64 * gres.double()).sum()).backward()
    for ours, ref in ((x.grad, x64.grad), (r.grad, r64.grad), (w.grad, w64.grad)):
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)

    x.grad = w.grad = None
    (rms_norm(x, w, EPS) * gy).sum().backward()
    x64.grad = w64.grad = None
    (_ref64(x64, w64) * gy.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)


def test_gradients_deterministic():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(33, 64, generator=g, requires_grad=True)
    w = torch.randn(64, generator=g, requires_grad=True)
    grads = []
    for _ in range(2):
        x.grad = w.grad = None
        rms_norm(x, w, EPS).square().sum().backward()
        grads.append((x.grad.clone(), w.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_bad_weight_names_the_fix():
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(torch.zeros(2, 8), torch.zeros(4), EPS)


def test_opcheck():
    x = torch.randn(4, 40, requires_grad=True)
    r = torch.randn(4, 40, requires_grad=True)
    w = torch.randn(40, requires_grad=True)
    torch.library.opcheck(torch.ops.lockstep.rms_norm, (x, w, EPS))
    torch.library.opcheck(torch.ops.lockstep.add_rms_norm, (x, r, w, EPS))
