"""qk_norm_rope: per-head RMSNorm of q and k then rope, on strided q/k views of one qkv projection.

CPU: exactly rms_norm then rope (the two references). Every device: a token's bits never depend
on the batch or on whether q/k are views or contiguous; accurate against float64; backward is
the inverse rotation then the RMSNorm backward.
"""

import pytest
import torch

from lockstep import kernels

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
HQ, HKV, D = 4, 2, 64


def _qkv(num_tokens: int, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(num_tokens, (HQ + 2 * HKV) * D, generator=g).to(device=device, dtype=dtype)
    q = qkv[:, : HQ * D].view(num_tokens, HQ, D)  # views, as the model slices its qkv projection
    k = qkv[:, HQ * D : (HQ + HKV) * D].view(num_tokens, HKV, D)
    weights = [(1 + 0.2 * torch.randn(D, generator=g)).to(device=device, dtype=dtype) for _ in range(2)]
    pos = torch.randint(0, 512, (num_tokens,), generator=g).to(device)
    cache = kernels.rope_cache(D, 512, 1e6).to(device)
    return q, k, weights, pos, cache


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_do_not_depend_on_batch_or_layout(device, dtype):
    q, k, (qw, kw), pos, cache = _qkv(97, dtype, device)
    q_out, k_out = kernels.qk_norm_rope(q, k, qw, kw, 1e-6, pos, cache)
    assert q_out.shape == q.shape and k_out.shape == k.shape and q_out.is_contiguous()
    contiguous = kernels.qk_norm_rope(q.contiguous(), k.contiguous(), qw, kw, 1e-6, pos, cache)
    assert torch.equal(contiguous[0], q_out) and torch.equal(contiguous[1], k_out)
    for rows in ([5], [0, 96], list(range(40, 72))):
        a, b = kernels.qk_norm_rope(q[rows], k[rows], qw, kw, 1e-6, pos[rows], cache)
        assert torch.equal(a, q_out[rows]) and torch.equal(b, k_out[rows])


def test_cpu_is_rms_norm_then_rope():
    q, k, (qw, kw), pos, cache = _qkv(33, torch.bfloat16, "cpu")
    want = kernels.rope(kernels.rms_norm(q, qw, 1e-6), kernels.rms_norm(k, kw, 1e-6), pos, cache)
    got = kernels.qk_norm_rope(q, k, qw, kw, 1e-6, pos, cache)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def _ref64(x, w, pos, cache):
    x = x.double()
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w.double()
    cs = cache.double()[pos]
    cos, sin = cs[:, None, : D // 2], cs[:, None, D // 2 :]
    y1, y2 = y[..., : D // 2], y[..., D // 2 :]
    return torch.cat([y1 * cos - y2 * sin, y2 * cos + y1 * sin], -1)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_matches_float64(device, dtype, bound):
    # fp32: a few roundings of fp32 ops; bf16: the norm's output and the result rounded to 8 bits.
    q, k, (qw, kw), pos, cache = _qkv(50, dtype, device)
    q_out, k_out = kernels.qk_norm_rope(q, k, qw, kw, 1e-6, pos, cache)
    assert _rel(q_out, _ref64(q, qw, pos, cache)) < bound
    assert _rel(k_out, _ref64(k, kw, pos, cache)) < bound


@pytest.mark.parametrize("device", DEVICES)
def test_backward_matches_float64(device):
    q, k, (qw, kw), pos, cache = _qkv(20, torch.float32, device)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, qw, kw)]
    q_out, k_out = kernels.qk_norm_rope(*leaves, 1e-6, pos, cache)
    gq, gk = torch.randn_like(q_out), torch.randn_like(k_out)
    (q_out * gq).sum().add((k_out * gk).sum()).backward()
    refs = [t.detach().double().requires_grad_() for t in (q, k, qw, kw)]
    (_ref64(refs[0], refs[2], pos, cache) * gq.double()).sum().add((_ref64(refs[1], refs[3], pos, cache) * gk.double()).sum()).backward()
    for got, ref in zip(leaves, refs):
        assert _rel(got.grad, ref.grad) < 1e-5


def test_bad_weight_shape_is_one_clear_error():
    q, k, (qw, kw), pos, cache = _qkv(3, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"q/k norm weights must be \[64\]"):
        kernels.qk_norm_rope(q, k, qw[:32], kw, 1e-6, pos, cache)


def test_opcheck():
    q, k, (qw, kw), pos, cache = _qkv(5, torch.float32, "cpu")
    args = (q.detach().requires_grad_(), k.detach().requires_grad_(), qw.requires_grad_(), kw.requires_grad_(), 1e-6,
            pos, cache)
    torch.library.opcheck(torch.ops.lockstep.qk_norm_rope, args)
