"""GPU: Triton RMSNorm / add+RMSNorm rows do not depend on the batch; forward and backward accuracy."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]


def _rn():
    from lockstep.kernels.triton import rms_norm

    return rms_norm


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _ref64(x, w, eps):
    x64 = x.double()
    return x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("h", [128, 2048, 4096, 1000])
def test_rows_do_not_depend_on_batch_and_match_float64(dtype, h):
    rn = _rn()
    x = torch.randn(300, h, device="cuda", dtype=dtype)
    r = torch.randn(300, h, device="cuda", dtype=dtype)
    w = torch.randn(h, device="cuda", dtype=dtype)
    y = rn.rms_norm_fwd(x, w, 1e-6)
    y2, new_r = rn.add_rms_norm_fwd(x, r, w, 1e-6)
    for m in (1, 5, 64, 299):
        idx = torch.randperm(300, device="cuda")[:m]
        assert torch.equal(rn.rms_norm_fwd(x[idx], w, 1e-6), y[idx])
        a, b = rn.add_rms_norm_fwd(x[idx], r[idx], w, 1e-6)
        assert torch.equal(a, y2[idx]) and torch.equal(b, new_r[idx])
    assert torch.equal(new_r, (x.float() + r.float()).to(dtype))
    assert torch.equal(y2, rn.rms_norm_fwd(new_r, w, 1e-6))  # add + norm == fused
    bound = 5e-3 if dtype == torch.bfloat16 else 1e-6
    assert _rel(y, _ref64(x, w, 1e-6)) < bound


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_backward_matches_float64_and_is_deterministic(dtype):
    rn = _rn()
    x = torch.randn(333, 2048, device="cuda", dtype=dtype)
    w = torch.randn(2048, device="cuda", dtype=dtype)
    g = torch.randn(333, 2048, device="cuda", dtype=dtype)
    gx, gw = rn.rms_norm_bwd(g, x, w, 1e-6)
    gx2, gw2 = rn.rms_norm_bwd(g, x, w, 1e-6)
    assert torch.equal(gx, gx2) and torch.equal(gw, gw2)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    _ref64(x64, w64, 1e-6).backward(g.double())
    bound = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert _rel(gx, x64.grad) < bound and _rel(gw, w64.grad) < bound


def test_custom_ops_route_to_triton():
    from lockstep import kernels

    rn = _rn()
    x = torch.randn(2, 50, 1024, device="cuda", dtype=torch.bfloat16)
    r = torch.randn_like(x)
    w = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(kernels.rms_norm(x, w, 1e-6).reshape(100, -1), rn.rms_norm_fwd(x.reshape(100, -1), w, 1e-6))
    y, new_r = kernels.add_rms_norm(x, r, w, 1e-6)
    y2, new_r2 = rn.add_rms_norm_fwd(x.reshape(100, -1), r.reshape(100, -1), w, 1e-6)
    assert torch.equal(y.reshape(100, -1), y2) and torch.equal(new_r.reshape(100, -1), new_r2)
