"""GPU: Triton silu_mul is elementwise (batch invariant) and accurate, forward and backward."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_silu_mul_invariant_and_accurate(dtype):
    from lockstep import kernels
    from lockstep.kernels.triton import activation

    gate_up = torch.randn(257, 2 * 3000, device="cuda", dtype=dtype) * 3
    out = activation.silu_mul_fwd(gate_up)
    idx = torch.randperm(257, device="cuda")[:9]
    assert torch.equal(activation.silu_mul_fwd(gate_up[idx]), out[idx])
    assert torch.equal(kernels.silu_mul(gate_up), out)
    g64 = gate_up.double().requires_grad_()
    ref = torch.nn.functional.silu(g64[:, :3000]) * g64[:, 3000:]
    bound = 5e-3 if dtype == torch.bfloat16 else 1e-6
    assert _rel(out, ref) < bound
    grad = torch.randn_like(out)
    ref.backward(grad.double())
    got = activation.silu_mul_bwd(grad, gate_up)
    assert _rel(got, g64.grad) < bound
    x = gate_up.clone().requires_grad_()
    kernels.silu_mul(x).backward(grad)
    assert torch.equal(x.grad, got)
