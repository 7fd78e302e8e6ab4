"""linear: batch invariance, TP shards combining to the unsplit bits, accuracy, gradients."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lockstep.kernels import TILE_K, linear, linear_partial, tree_combine

SETTINGS = settings(max_examples=25, deadline=None)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _tree_bound(k: int, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Pairwise-summation bound: (tree height + 1) * eps32 * (|x| @ |w|^T), in float64."""
    height = math.ceil(math.log2(TILE_K)) + math.ceil(math.log2(max(1, -(-k // TILE_K)))) + 1
    return height * 2**-24 * (x.abs().double() @ w.abs().double().T)


@SETTINGS
@given(
    m=st.integers(1, 64),
    k=st.integers(1, 200),
    n=st.integers(1, 48),
    dtype=st.sampled_from(DTYPES),
    bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_row_is_batch_invariant(m, k, n, dtype, bias, seed):
    g = _gen(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    full = linear(x, w, b)
    assert full.dtype == dtype and full.shape == (m, n)
    i = seed % m
    assert torch.equal(linear(x[i : i + 1], w, b), full[i : i + 1])
    perm = torch.randperm(m, generator=g)
    assert torch.equal(linear(x[perm], w, b), full[perm])
    # A row surrounded by 63 others, as in a big batch.
    big = torch.cat([torch.randn(63, k, generator=g).to(dtype), x[i : i + 1]])
    assert torch.equal(linear(big, w, b)[-1:], full[i : i + 1])
    assert torch.equal(linear(x, w, b), full)  # run to run


@SETTINGS
@given(
    m=st.integers(1, 40),
    tiles_per_shard=st.integers(1, 5),
    num_shards=st.sampled_from([2, 4]),
    n=st.integers(1, 24),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_k_shards_combine_to_the_unsplit_bits(m, tiles_per_shard, num_shards, n, dtype, seed):
    g = _gen(seed)
    k_per_rank = tiles_per_shard * TILE_K
    x = torch.randn(m, num_shards * k_per_rank, generator=g).to(dtype)
    w = torch.randn(n, num_shards * k_per_rank, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    partials = [
        linear_partial(x[:, r * k_per_rank : (r + 1) * k_per_rank], w[:, r * k_per_rank : (r + 1) * k_per_rank])
        for r in range(num_shards)
    ]
    combined = tree_combine(partials)
    assert combined.dtype == torch.float32
    assert torch.equal(combined, linear_partial(x, w))
    assert torch.equal((combined + b.float()).to(dtype), linear(x, w, b))


def test_tree_combine_rejects_bad_input():
    p = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="power-of-two"):
        tree_combine([p, p, p])
    with pytest.raises(ValueError, match="fp32"):
        tree_combine([p.bfloat16(), p.bfloat16()])
    with pytest.raises(ValueError, match="disagree"):
        linear(torch.zeros(2, 3), torch.zeros(4, 5))


@SETTINGS
@given(m=st.integers(1, 32), k=st.integers(1, 300), n=st.integers(1, 32), seed=st.integers(0, 2**31 - 1))
def test_accuracy_against_float64(m, k, n, seed):
    g = _gen(seed)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    ref = x.double() @ w.double().T
    assert ((linear(x, w).double() - ref).abs() <= _tree_bound(k, x, w)).all()
    xb, wb = x.bfloat16(), w.bfloat16()
    ref_b = xb.double() @ wb.double().T
    out_b = linear(xb, wb).double()
    # fp32 tree error plus one bf16 rounding of the result (half an ulp: 2^-8 relative).
    assert ((out_b - ref_b).abs() <= _tree_bound(k, xb, wb) + 2**-8 * ref_b.abs()).all()


def test_packed_tokens_and_leading_dims():
    x = torch.randn(2, 5, 40)
    w = torch.randn(7, 40)
    assert torch.equal(linear(x, w), linear(x.reshape(10, 40), w).reshape(2, 5, 7))


@pytest.mark.parametrize("bias", [False, True])
def test_gradients_against_float64(bias):
    g = _gen(0)
    x = torch.randn(37, 70, generator=g, requires_grad=True)
    w = torch.randn(11, 70, generator=g, requires_grad=True)
    b = torch.randn(11, generator=g, requires_grad=True) if bias else None
    grad_out = torch.randn(37, 11, generator=g)
    (linear(x, w, b) * grad_out).sum().backward()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if bias else None
    out64 = x64 @ w64.T + (b64 if bias else 0)
    (out64 * grad_out.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(b.grad.double(), b64.grad, rtol=1e-5, atol=1e-5)


def test_gradients_are_deterministic_and_grad_x_rows_batch_invariant():
    g = _gen(1)
    w = torch.randn(9, 50, generator=g, requires_grad=True)
    x = torch.randn(20, 50, generator=g, requires_grad=True)
    grad_out = torch.randn(20, 9, generator=g)

    def grads(xs, gs):
        xs = xs.detach().requires_grad_()
        w.grad = None
        (linear(xs, w) * gs).sum().backward()
        return xs.grad, w.grad.clone()

    gx, gw = grads(x, grad_out)
    gx2, gw2 = grads(x, grad_out)
    assert torch.equal(gx, gx2) and torch.equal(gw, gw2)
    assert torch.equal(grads(x[3:4], grad_out[3:4])[0], gx[3:4])


def test_bf16_activations_with_fp32_weights():
    x = torch.randn(6, 64).bfloat16().requires_grad_()
    w = torch.randn(5, 64, requires_grad=True)
    out = linear(x, w)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32


def test_opcheck():
    x = torch.randn(3, 40, requires_grad=True)
    w = torch.randn(4, 40, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    torch.library.opcheck(torch.ops.lockstep.linear, (x, w, b))
    torch.library.opcheck(torch.ops.lockstep.linear, (x, w, None))
    torch.library.opcheck(torch.ops.lockstep.linear_partial, (x, w))


def test_linear_group_is_the_separate_linears_and_their_grads():
    from lockstep.kernels import linear_group

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 64, generator=g, requires_grad=True)
    ws = [torch.randn(n, 64, generator=g, requires_grad=True) for n in (32, 16, 16)]
    out = linear_group(x, ws)
    assert torch.equal(out, torch.cat([linear(x, w) for w in ws], dim=-1))
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad)
    x64, g64 = x.detach().double().reshape(-1, 64), grad.double().reshape(14, -1)
    cols = torch.cumsum(torch.tensor([0, 32, 16, 16]), 0)
    gx64 = sum(g64[:, a:b] @ w.detach().double() for a, b, w in zip(cols[:-1], cols[1:], ws))
    assert ((x.grad.double().reshape(14, 64) - gx64).abs().max() < 1e-5)
    for a, b, w in zip(cols[:-1], cols[1:], ws):
        assert (w.grad.double() - g64[:, a:b].T @ x64).abs().max() < 1e-5
    with pytest.raises(ValueError, match="1-3 weights"):
        linear_group(x, ws + ws)
    torch.library.opcheck(torch.ops.lockstep.linear_group, (x.detach().requires_grad_(), *ws))
    torch.library.opcheck(torch.ops.lockstep.linear_group, (x.detach().requires_grad_(), ws[0], ws[1], None))
