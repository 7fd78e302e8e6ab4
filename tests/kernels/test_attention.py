"""attention_varlen / attention_paged / write_kv_cache: prefill == chunked prefill == decode."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lockstep.kernels import attention_paged, attention_varlen, write_kv_cache

SETTINGS = settings(max_examples=20, deadline=None)


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def _ref64(q, k, v, lens, scale):
    """Per-sequence float64 SDPA, GQA by repeating kv heads."""
    group = q.shape[1] // k.shape[1]
    outs, start = [], 0
    for n in lens:
        qs, ks, vs = (t[start : start + n].double().transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(group, 0), vs.repeat_interleave(group, 0)
        outs.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1))
        start += n
    return torch.cat(outs)


class PagedCache:
    """A paged cache full of NaN garbage, blocks handed out in a shuffled order."""

    def __init__(self, lens, block_size, num_kv_heads, head_dim, dtype, gen):
        max_blocks = max(-(-n // block_size) for n in lens) + 1
        num_blocks = len(lens) * max_blocks + 3
        self.block_size = block_size
        self.k = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
        self.v = torch.full_like(self.k, float("nan"))
        free = torch.randperm(num_blocks, generator=gen).tolist()
        # Unused table entries point at garbage blocks too.
        self.block_table = torch.tensor([[free.pop() for _ in range(max_blocks)] for _ in lens], dtype=torch.int32)

    def slots(self, seq, positions):
        positions = torch.as_tensor(positions)
        return self.block_table[seq, positions // self.block_size].long() * self.block_size + positions % self.block_size


@SETTINGS
@given(
    lens=st.lists(st.integers(1, 64), min_size=1, max_size=4),
    num_kv_heads=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 2, 3]),
    head_dim=st.sampled_from([16, 32, 64]),
    block_size=st.sampled_from([1, 8, 16]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_prefill_chunked_prefill_and_decode_agree_bitwise(lens, num_kv_heads, group, head_dim, block_size, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    num_tokens, num_q_heads, scale = sum(lens), num_kv_heads * group, head_dim**-0.5
    q = torch.randn(num_tokens, num_q_heads, head_dim, generator=g).to(dtype)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(dtype)
    cu = _cu(lens)
    full = attention_varlen(q, k, v, cu, scale)
    assert full.shape == q.shape and full.dtype == dtype

    # One sequence alone, and the batch in another order: same rows.
    b = seed % len(lens)
    rows = slice(int(cu[b]), int(cu[b + 1]))
    assert torch.equal(attention_varlen(q[rows], k[rows], v[rows], _cu([lens[b]]), scale), full[rows])
    order = list(reversed(range(len(lens))))
    idx = torch.cat([torch.arange(int(cu[i]), int(cu[i + 1])) for i in order])
    assert torch.equal(attention_varlen(q[idx], k[idx], v[idx], _cu([lens[i] for i in order]), scale), full[idx])

    # Paged, in chunks: each step writes its tokens' K/V, then attends; the last step
    # is one-token decode for every sequence still going.
    cache = PagedCache(lens, block_size, num_kv_heads, head_dim, dtype, g)
    done = [0] * len(lens)
    while any(d < n for d, n in zip(done, lens)):
        step = [i for i, n in enumerate(lens) if done[i] < n]
        new = [min(lens[i] - done[i], 1 + int(torch.randint(0, 40, (1,), generator=g))) for i in step]
        tok = torch.cat([torch.arange(int(cu[i]) + done[i], int(cu[i]) + done[i] + c) for i, c in zip(step, new)])
        slots = torch.cat([cache.slots(i, torch.arange(done[i], done[i] + c)) for i, c in zip(step, new)])
        write_kv_cache(k[tok], v[tok], cache.k, cache.v, slots)
        seq_lens = torch.tensor([done[i] + c for i, c in zip(step, new)], dtype=torch.int32)
        out = attention_paged(q[tok], cache.k, cache.v, cache.block_table[step], seq_lens, _cu(new), scale)
        assert torch.equal(out, full[tok])
        for i, c in zip(step, new):
            done[i] += c


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
def test_accuracy_against_float64(dtype, tol):
    g = torch.Generator().manual_seed(0)
    lens = [1, 37, 100]
    q = torch.randn(138, 4, 64, generator=g).to(dtype)
    k = torch.randn(138, 2, 64, generator=g).to(dtype)
    v = torch.randn(138, 2, 64, generator=g).to(dtype)
    out = attention_varlen(q, k, v, _cu(lens), 0.125).double()
    ref = _ref64(q, k, v, lens, 0.125)
    # fp32: a few ulp of the O(1) outputs; bf16: one rounding of the output (2^-8 relative).
    assert (out - ref).abs().max() <= tol


def test_gradients_against_float64_and_deterministic():
    g = torch.Generator().manual_seed(1)
    lens = [3, 45, 70]
    q = torch.randn(118, 4, 32, generator=g, requires_grad=True)
    k = torch.randn(118, 2, 32, generator=g, requires_grad=True)
    v = torch.randn(118, 2, 32, generator=g, requires_grad=True)
    grad_out = torch.randn(118, 4, 32, generator=g)

    def grads():
        for t in (q, k, v):
            t.grad = None
        (attention_varlen(q, k, v, _cu(lens), 0.2) * grad_out).sum().backward()
        return [t.grad.clone() for t in (q, k, v)]

    first, second = grads(), grads()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    (_ref64(q64, k64, v64, lens, 0.2) * grad_out.double()).sum().backward()
    for ours, ref in zip(first, (q64.grad, k64.grad, v64.grad)):
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)


def test_bf16_gradients_flow():
    q = torch.randn(10, 2, 32).bfloat16().requires_grad_()
    k = torch.randn(10, 1, 32).bfloat16().requires_grad_()
    v = torch.randn(10, 1, 32).bfloat16().requires_grad_()
    attention_varlen(q, k, v, _cu([4, 6]), 0.2).float().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and torch.isfinite(k.grad.float()).all()


def test_write_kv_cache_skips_padding_slots():
    k_cache = torch.zeros(3, 4, 1, 2)
    v_cache = torch.zeros(3, 4, 1, 2)
    k = torch.arange(6.0).reshape(3, 1, 2) + 1
    write_kv_cache(k, -k, k_cache, v_cache, torch.tensor([5, -1, 11]))
    assert torch.equal(k_cache[1, 1, 0], k[0, 0]) and torch.equal(k_cache[2, 3, 0], k[2, 0])
    assert torch.equal(v_cache[2, 3, 0], -k[2, 0])
    assert int((k_cache != 0).sum()) == 4  # the padded row went nowhere


def test_bad_input_names_the_fix():
    q = torch.zeros(4, 3, 32)
    kv = torch.zeros(4, 2, 32)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        attention_varlen(q, kv, kv, _cu([4]), 1.0)
    with pytest.raises(ValueError, match="rise from 0 to T"):
        attention_varlen(q[:, :2], kv, kv, _cu([3]), 1.0)
    with pytest.raises(ValueError, match=r"k and v \[T, Hkv, D\]"):
        attention_varlen(q[:, :2], kv[:3], kv[:3], _cu([4]), 1.0)
    cache = torch.zeros(2, 4, 2, 32)
    with pytest.raises(ValueError, match="seq_lens must include them"):
        attention_paged(q[:, :2], cache, cache, torch.zeros(1, 2, dtype=torch.int32), torch.tensor([2]), _cu([4]), 1.0)
    with pytest.raises(ValueError, match="block_table holds 8 slots"):
        attention_paged(q[:, :2], cache, cache, torch.zeros(1, 2, dtype=torch.int32), torch.tensor([9]), _cu([4]), 1.0)
    with pytest.raises(ValueError, match=r"seq_lens must be \[B=1\]"):
        attention_paged(q[:, :2], cache, cache, torch.zeros(1, 2, dtype=torch.int32), torch.tensor([4, 4]), _cu([4]), 1.0)
    with pytest.raises(ValueError, match=r"block_table \[B, MB\]"):
        attention_paged(q[:, :2], cache, cache, torch.zeros(2, 2, dtype=torch.int32), torch.tensor([4]), _cu([4]), 1.0)


def test_opcheck():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(6, 2, 16, generator=g, requires_grad=True)
    k = torch.randn(6, 1, 16, generator=g, requires_grad=True)
    v = torch.randn(6, 1, 16, generator=g, requires_grad=True)
    torch.library.opcheck(torch.ops.lockstep.attention_varlen, (q, k, v, _cu([2, 4]), 0.25))
    k_cache, v_cache = torch.randn(3, 4, 1, 16, generator=g), torch.randn(3, 4, 1, 16, generator=g)
    table = torch.tensor([[2, 0], [1, 0]], dtype=torch.int32)
    args = (q.detach()[:3], k_cache, v_cache, table, torch.tensor([5, 3], dtype=torch.int32), _cu([1, 2]), 0.25,
            torch.empty(3, 2, 16))
    torch.library.opcheck(torch.ops.lockstep.attention_paged, args)
    slots = torch.tensor([0, 5, -1, 9, 10, 11])
    torch.library.opcheck(torch.ops.lockstep.write_kv_cache, (k.detach(), v.detach(), k_cache.clone(), v_cache.clone(), slots))
