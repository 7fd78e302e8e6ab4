"""GPU: Triton rope rotates each token by its absolute position only; inverse undoes it."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_invariant_accurate_and_routed(dtype):
    from lockstep import kernels
    from lockstep.kernels.triton import rope

    cache = kernels.rope_cache(128, 4096, 1_000_000.0).cuda()
    qkv = torch.randn(300, 16 + 8 + 8, 128, device="cuda", dtype=dtype)
    q, k = qkv[:, :16], qkv[:, 16:24]  # views into a fused qkv, as the model makes them
    pos = torch.randint(0, 4096, (300,), device="cuda")
    q_rot, k_rot = rope.rope_fwd(q, k, pos, cache, False)
    idx = torch.randperm(300, device="cuda")[:7]
    a, b = rope.rope_fwd(q[idx], k[idx], pos[idx], cache, False)
    assert torch.equal(a, q_rot[idx]) and torch.equal(b, k_rot[idx])
    cs = cache.double()[pos]
    cos, sin = cs[:, None, :64], cs[:, None, 64:]
    x = q.double()
    ref = torch.cat([x[..., :64] * cos - x[..., 64:] * sin, x[..., 64:] * cos + x[..., :64] * sin], -1)
    assert _rel(q_rot, ref) < (5e-3 if dtype == torch.bfloat16 else 1e-6)
    if dtype == torch.float32:
        back, _ = rope.rope_fwd(q_rot, k_rot, pos, cache, True)
        assert _rel(back, q) < 1e-6
    got_q, got_k = kernels.rope(q, k, pos, cache)
    assert torch.equal(got_q, q_rot) and torch.equal(got_k, k_rot)
