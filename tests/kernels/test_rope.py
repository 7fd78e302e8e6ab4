"""rope + rope_cache: position-only dependence, accuracy, inverse rotation as backward."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lockstep.kernels import rope, rope_cache

SETTINGS = settings(max_examples=25, deadline=None)


def _ref64(x, positions, head_dim, base):
    half = head_dim // 2
    inv_freq = base ** (-torch.arange(half, dtype=torch.float64) * 2 / head_dim)
    ang = positions.double()[:, None] * inv_freq[None]
    cos, sin = torch.cos(ang)[:, None], torch.sin(ang)[:, None]
    x = x.double()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def test_cache_rows_do_not_depend_on_max_positions():
    big = rope_cache(64, 1000, 1e6)
    assert big.dtype == torch.float32 and big.shape == (1000, 64)
    for max_positions in (1, 17, 256, 257, 999):
        assert torch.equal(rope_cache(64, max_positions, 1e6), big[:max_positions])
    assert torch.equal(big[:, :32][0], torch.ones(32)) and torch.equal(big[:, 32:][0], torch.zeros(32))


@SETTINGS
@given(
    t=st.integers(1, 64),
    hq=st.integers(1, 4),
    hkv=st.integers(1, 2),
    d=st.sampled_from([32, 64]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_tokens_are_batch_invariant(t, hq, hkv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    cache = rope_cache(d, 512, 10000.0)
    q = torch.randn(t, hq, d, generator=g).to(dtype)
    k = torch.randn(t, hkv, d, generator=g).to(dtype)
    pos = torch.randint(0, 512, (t,), generator=g)
    qo, ko = rope(q, k, pos, cache)
    assert qo.dtype == dtype and ko.shape == k.shape
    i = seed % t
    qi, ki = rope(q[i : i + 1], k[i : i + 1], pos[i : i + 1], cache)
    assert torch.equal(qi, qo[i : i + 1]) and torch.equal(ki, ko[i : i + 1])
    perm = torch.randperm(t, generator=g)
    qp, kp = rope(q[perm], k[perm], pos[perm], cache)
    assert torch.equal(qp, qo[perm]) and torch.equal(kp, ko[perm])


def test_accuracy_and_gradients_against_float64():
    d, base = 64, 1e6
    cache = rope_cache(d, 4096, base)
    pos = torch.tensor([0, 1, 7, 100, 4095])
    q = torch.randn(5, 4, d, requires_grad=True)
    k = torch.randn(5, 2, d, requires_grad=True)
    qo, ko = rope(q, k, pos, cache)
    torch.testing.assert_close(qo.double(), _ref64(q.detach(), pos, d, base), rtol=0, atol=2e-6)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    ((qo * gq).sum() + (ko * gk).sum()).backward()
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    ((_ref64(q64, pos, d, base) * gq.double()).sum() + (_ref64(k64, pos, d, base) * gk.double()).sum()).backward()
    torch.testing.assert_close(q.grad.double(), q64.grad, rtol=0, atol=2e-6)
    torch.testing.assert_close(k.grad.double(), k64.grad, rtol=0, atol=2e-6)
    # Only q used: k gets no gradient, q's still flows.
    q.grad = None
    rope(q, k.detach(), pos, cache)[0].sum().backward()
    assert q.grad is not None


def test_position_past_cache_names_the_fix():
    with pytest.raises(ValueError, match="larger rope_cache"):
        rope(torch.zeros(1, 1, 32), torch.zeros(1, 1, 32), torch.tensor([10]), rope_cache(32, 8))


def test_opcheck():
    cache = rope_cache(32, 16)
    args = (torch.randn(3, 2, 32, requires_grad=True), torch.randn(3, 1, 32, requires_grad=True), torch.tensor([0, 5, 15]), cache, False)
    torch.library.opcheck(torch.ops.lockstep.rope, args)
