"""GPU: Triton attention gives a query the same bits in varlen, chunked prefill and decode."""

import math

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]

DTYPES = [torch.bfloat16, torch.float32]
# (Hq, Hkv, D): Qwen3-1.7B / 8B head layouts, MHA, a small head_dim.
HEADS = [(16, 8, 128), (32, 8, 128), (4, 4, 64), (6, 2, 64)]


def _attn():
    from lockstep.kernels.triton import attention

    return attention


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")


def _qkv(num_tokens, hq, hkv, d, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(num_tokens, h, d, device="cuda", dtype=dtype, generator=gen) for h in (hq, hkv, hkv)]


def _reference(q, k, v, lens, scale):
    """float64 causal GQA, one sequence at a time."""
    out, group = [], q.shape[1] // k.shape[1]
    for s, e in zip(_cu(lens)[:-1].tolist(), _cu(lens)[1:].tolist()):
        qq, kk, vv = q[s:e].double(), k[s:e].double().repeat_interleave(group, 1), v[s:e].double().repeat_interleave(group, 1)
        scores = torch.einsum("thd,shd->hts", qq, kk) * scale
        causal = torch.ones(e - s, e - s, dtype=torch.bool, device="cuda").tril()
        out.append(torch.einsum("hts,shd->thd", scores.masked_fill(~causal, -math.inf).softmax(-1), vv))
    return torch.cat(out)


def _paged(k, v, lens, block_size, seed=0):
    """Caches with blocks in shuffled order and NaN in every slot not written -> (k_cache, v_cache, table)."""
    attn = _attn()
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in lens]
    num_blocks = sum(blocks_per_seq) + 5
    order = torch.randperm(num_blocks, generator=gen)
    table = torch.zeros(len(lens), max(blocks_per_seq) + 2, dtype=torch.int32)
    slots, used = [], 0
    for b, n in enumerate(lens):
        table[b, : blocks_per_seq[b]] = order[used : used + blocks_per_seq[b]]
        used += blocks_per_seq[b]
        slots += [int(table[b, p // block_size]) * block_size + p % block_size for p in range(n)]
    shape = (num_blocks, block_size, *k.shape[1:])
    k_cache = torch.full(shape, math.nan, device="cuda", dtype=k.dtype)
    v_cache = torch.full(shape, math.nan, device="cuda", dtype=v.dtype)
    attn.write_kv_cache(k, v, k_cache, v_cache, torch.tensor(slots, device="cuda"))
    return k_cache, v_cache, table.cuda()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d", HEADS)
def test_varlen_matches_float64(dtype, hq, hkv, d):
    attn = _attn()
    lens = [1, 37, 300, 129]
    q, k, v = _qkv(sum(lens), hq, hkv, d, dtype)
    scale = d**-0.5
    out, lse = attn.attention_varlen_fwd(q, k, v, _cu(lens), scale)
    # bf16 operands of P@V and a bf16 output: ~3e-3; fp32 (3xTF32 products): ~1e-6.
    assert _rel(out, _reference(q, k, v, lens, scale)) < (1e-2 if dtype == torch.bfloat16 else 1e-5)
    assert torch.isfinite(lse).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d", HEADS[:2] + HEADS[3:])
def test_prefill_chunked_decode_and_batch_give_the_same_bits(dtype, hq, hkv, d):
    attn = _attn()
    lens = [300, 5, 129, 64, 1]
    q, k, v = _qkv(sum(lens), hq, hkv, d, dtype, seed=1)
    cu, scale = _cu(lens), d**-0.5
    full, _ = attn.attention_varlen_fwd(q, k, v, cu, scale)
    assert torch.equal(full, attn.attention_varlen_fwd(q, k, v, cu, scale)[0])  # run to run
    # Each sequence alone (another position in the batch) gives its rows of the packed run.
    for b, n in enumerate(lens):
        s = int(cu[b])
        alone, _ = attn.attention_varlen_fwd(q[s : s + n], k[s : s + n], v[s : s + n], _cu([n]), scale)
        assert torch.equal(alone, full[s : s + n])
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    for block_size in (16, 32):
        k_cache, v_cache, table = _paged(k, v, lens, block_size, seed=block_size)
        # Full prefill through the cache.
        assert torch.equal(attn.attention_paged_fwd(q, k_cache, v_cache, table, seq_lens, cu, scale), full)
        # Decode: the last token of every sequence.
        last = (cu[1:] - 1).long()
        cu_one = torch.arange(len(lens) + 1, dtype=torch.int32, device="cuda")
        decode = attn.attention_paged_fwd(q[last], k_cache, v_cache, table, seq_lens, cu_one, scale)
        assert torch.equal(decode, full[last])
        # Chunked prefill: the last 1..70 tokens of each sequence, sequences in reversed order.
        num_new = [min(n, 70 - 13 * b) for b, n in enumerate(lens)][::-1]
        order = list(range(len(lens)))[::-1]
        rows = torch.cat([torch.arange(int(cu[b + 1]) - m, int(cu[b + 1])) for b, m in zip(order, num_new)]).cuda()
        chunk = attn.attention_paged_fwd(q[rows], k_cache, v_cache, table[order], seq_lens[order], _cu(num_new), scale)
        assert torch.equal(chunk, full[rows])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sequence_major_grid_gives_the_same_bits(dtype):
    """The decode launch (a program per sequence, 64-row tiles on one warpgroup) on a prefill batch
    equals the query-tile launch (128-row tiles on two)."""
    attn = _attn()
    lens = [300, 1, 129, 64]
    q, k, v = _qkv(sum(lens), 16, 8, 128, dtype, seed=6)
    cu, scale = _cu(lens), 128**-0.5
    tiles, lse = attn.attention_varlen_fwd(q, k, v, cu, scale, decode=False)
    seqs, lse_seqs = attn.attention_varlen_fwd(q, k, v, cu, scale, decode=True)
    assert torch.equal(seqs, tiles) and torch.equal(lse_seqs, lse)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d", [HEADS[0], HEADS[3]])
def test_split_kv_launch_gives_the_same_bits(dtype, hq, hkv, d):
    """Contexts over several SPLIT_KV splits: the split launch (a program per split, then the
    merge kernel) equals the launches that walk the splits in one program, in decode, chunked
    prefill and a whole prefill; and all are accurate against float64."""
    attn = _attn()
    split = attn.SPLIT_KV
    lens = [1, split - 1, split, split + 1, 3 * split - 60, 4 * split + 77]
    q, k, v = _qkv(sum(lens), hq, hkv, d, dtype, seed=7)
    cu, scale = _cu(lens), d**-0.5
    full, lse = attn.attention_varlen_fwd(q, k, v, cu, scale, decode=False)
    assert _rel(full, _reference(q, k, v, lens, scale)) < (1e-2 if dtype == torch.bfloat16 else 1e-5)
    whole, whole_lse = attn.attention_varlen_fwd(q, k, v, cu, scale, decode=True, split=True)
    assert torch.equal(whole, full) and torch.equal(whole_lse, lse)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    k_cache, v_cache, table = _paged(k, v, lens, 16, seed=3)
    last = (cu[1:] - 1).long()
    cu_one = torch.arange(len(lens) + 1, dtype=torch.int32, device="cuda")
    for use_split in (True, False):
        decode = attn.attention_paged_fwd(q[last], k_cache, v_cache, table, seq_lens, cu_one, scale, split=use_split)
        assert torch.equal(decode, full[last]), f"decode, split={use_split}"
    # Chunked prefill through the split launch: the last 1..40 tokens of each sequence.
    num_new = [min(n, 1 + 7 * b) for b, n in enumerate(lens)]
    rows = torch.cat([torch.arange(int(cu[b + 1]) - m, int(cu[b + 1])) for b, m in enumerate(num_new)]).cuda()
    chunk = attn.attention_paged_fwd(q[rows], k_cache, v_cache, table, seq_lens, _cu(num_new), scale, decode=True,
                                     split=True)
    assert torch.equal(chunk, full[rows])


def test_split_kv_launch_is_automatic_for_small_decode_batches(monkeypatch):
    """A decode batch of few sequences takes the split launch, a large one does not (same bits)."""
    attn = _attn()
    launches = []
    real = attn._split_kernel
    monkeypatch.setattr(attn, "_split_kernel", type("Spy", (), {
        "__getitem__": lambda self, grid: (launches.append(grid), real[grid])[1]})())
    for num_seqs, want in ((2, True), (64, False)):
        launches.clear()
        lens = [3 * attn.SPLIT_KV] * num_seqs
        q, k, v = _qkv(sum(lens), 16, 8, 128, torch.bfloat16, seed=num_seqs)
        k_cache, v_cache, table = _paged(k, v, lens, 16, seed=1)
        cu = _cu(lens)
        last = (cu[1:] - 1).long()
        cu_one = torch.arange(num_seqs + 1, dtype=torch.int32, device="cuda")
        seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
        out = attn.attention_paged_fwd(q[last], k_cache, v_cache, table, seq_lens, cu_one, 128**-0.5)
        assert bool(launches) == want
        assert torch.equal(out, attn.attention_paged_fwd(q[last], k_cache, v_cache, table, seq_lens, cu_one,
                                                         128**-0.5, split=not want))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d", HEADS[:1] + HEADS[3:])
def test_backward_matches_float64_and_is_deterministic(dtype, hq, hkv, d):
    attn = _attn()
    lens = [200, 1, 77]
    q, k, v = _qkv(sum(lens), hq, hkv, d, dtype, seed=2)
    cu, scale = _cu(lens), d**-0.5
    out, lse = attn.attention_varlen_fwd(q, k, v, cu, scale)
    grad = torch.randn_like(out)
    grads = attn.attention_varlen_bwd(grad, q, k, v, out, lse, cu, scale)
    assert all(torch.equal(a, b) for a, b in zip(grads, attn.attention_varlen_bwd(grad, q, k, v, out, lse, cu, scale)))
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    _reference(q64, k64, v64, lens, scale).backward(grad.double())
    bound = 2e-2 if dtype == torch.bfloat16 else 1e-5  # bf16: P and dS rounded to bf16 for the MMAs
    for got, ref in zip(grads, (q64.grad, k64.grad, v64.grad)):
        assert _rel(got, ref) < bound


def test_custom_ops_route_to_triton():
    from lockstep import kernels

    attn = _attn()
    lens = [33, 70]
    q, k, v = _qkv(sum(lens), 16, 8, 128, torch.bfloat16, seed=3)
    cu, scale = _cu(lens), 128**-0.5
    out, lse = attn.attention_varlen_fwd(q, k, v, cu, scale)
    assert torch.equal(kernels.attention_varlen(q, k, v, cu, scale), out)
    k_cache, v_cache, table = _paged(k, v, lens, 16)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    assert torch.equal(kernels.attention_paged(q, k_cache, v_cache, table, seq_lens, cu, scale), out)
    # The op's backward goes through attention_varlen_bwd.
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    grad = torch.randn_like(out)
    kernels.attention_varlen(qg, kg, vg, cu, scale).backward(grad)
    dq, dk, dv = attn.attention_varlen_bwd(grad, q, k, v, out, lse, cu, scale)
    assert torch.equal(qg.grad, dq) and torch.equal(kg.grad, dk) and torch.equal(vg.grad, dv)


def test_write_kv_cache_matches_reference_and_skips_padding():
    from lockstep.kernels.kv_cache import write_kv_cache_reference

    attn = _attn()
    k, v = torch.randn(9, 8, 128, device="cuda", dtype=torch.bfloat16), torch.randn(9, 8, 128, device="cuda", dtype=torch.bfloat16)
    slots = torch.tensor([5, 0, -1, 17, 63, 31, -1, 2, 40], device="cuda")
    caches = [torch.zeros(4, 16, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    attn.write_kv_cache(k, v, caches[0], caches[1], slots)
    write_kv_cache_reference(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


def test_paged_pages_with_k_then_v_blocks():
    """vLLM's page layout (our backend): each page is a K block followed by a V block."""
    attn = _attn()
    lens = [5, 40, 17]
    block_size, (hq, hkv, d) = 16, HEADS[0]
    q, k, v = _qkv(sum(lens), hq, hkv, d, torch.bfloat16, seed=4)
    cu, scale = _cu(lens), d**-0.5
    k_dense, v_dense, table = _paged(k, v, lens, block_size, seed=5)
    pages = torch.full((k_dense.shape[0], 2, *k_dense.shape[1:]), math.nan, device="cuda", dtype=k.dtype)
    k_cache, v_cache = pages[:, 0], pages[:, 1]  # block stride = 2 blocks
    k_cache.copy_(k_dense)
    v_cache.copy_(v_dense)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    dense = attn.attention_paged_fwd(q, k_dense, v_dense, table, seq_lens, cu, scale)
    assert torch.equal(attn.attention_paged_fwd(q, k_cache, v_cache, table, seq_lens, cu, scale), dense)
