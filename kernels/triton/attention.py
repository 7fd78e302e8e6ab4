"""Causal GQA flash attention on NVIDIA GPUs: packed sequences (varlen) and a paged KV cache.

Forward: ONE compiled kernel serves both layouts (the layout is a runtime argument that only
changes where a key row is read from), so the arithmetic is literally the same code. A program
holds BLOCK_M rows = (query token, query head of the kv group) pairs of one sequence and walks
KV tiles [j*BLOCK_N, (j+1)*BLOCK_N) aligned to ABSOLUTE key positions, in increasing j, with
an fp32 online softmax (base 2). Every tile goes through the same masked body: keys after the
query or at/after seq_len get score -inf (`where`, so garbage or NaN in a paged cache never
leaks; their K/V loads are zeroed too), and a tile with no visible key is an exact no-op for
that row (alpha = exp2(0) = 1, the added terms are zeros). Rows of an MMA never mix, so a
query's bits do not depend on the rows it shares a program with: a query at position t gets
the same output in a full prefill, a chunked prefill and a one-token decode, in any batch.
Decode batches (no more query tokens than sequences) run one program per (sequence, kv head)
walking the sequence's query tiles, which spares the search over cu_q; other batches one
program per (query tile, kv head). Decode programs hold 64 rows on one warpgroup (4 warps)
instead of 128 on two: each warp still owns 16 rows with the same wgmma instruction shape
and the same split of keys over its lanes, so every row's dots, maxima and sums are the
same operations in the same order (tested bit-equal), while two decode programs fit on an
SM where one did (decode is latency-bound: a sequence has few KV tiles).

Split over KV: keys are cut into splits of SPLIT_KV absolute positions. Every path computes a
query's online-softmax state over each split from an empty state and merges the states in
split order (`_merge`, explicit fma), so the split is part of the arithmetic, not of the launch:
the query-tile and sequence launches walk the splits one after another in one program; decode
batches too small to fill the GPU (at most half an SM per (sequence, kv head)), over caches
that may span _MIN_SPLITS splits or more, instead give each split its own program
(`_split_kernel`, partial states in fp32) and merge them in a second launch (`_merge_kernel`),
so a long context is read by many SMs at once. Same bits either way
(tests/kernels/test_triton_attention.py). The split count of that launch is bounded by the
block table's width, a host-side shape, so CUDA graphs capture it; programs past a sequence's
length return at once.

Backward (varlen only): flash-style recompute from lse; dK/dV by one program per KV tile
walking the query tiles in order, dQ by one program per query tile walking the KV tiles in
order; no atomics, so two runs give the same bits.
"""

import torch
import triton
import triton.language as tl

# One config per dtype, for every batch / layout: (rows, keys per KV tile, warps, dot precision).
# KV tiles are [j*BLOCK_N, (j+1)*BLOCK_N) in absolute key positions.
_FWD = {
    torch.bfloat16: (128, 64, 8, "tf32"),
    torch.float16: (128, 64, 8, "tf32"),
    torch.float32: (64, 32, 4, "tf32x3"),  # fp32-accurate products on tensor cores
}
# Decode launches: the same per-warp layout as _FWD on half the warps (module docstring).
_DECODE = {dtype: (64, block_n, 4, precision) for dtype, (_, block_n, _, precision) in _FWD.items()}
_FWD_STAGES = 3  # software pipelining depth (speed only; measured on H200, benchmarks/kernels.py --sweep)
_DECODE_STAGES = 2  # two decode programs per SM fit in shared memory (2 x 80 KB)
_BWD_STAGES = 2
# Backward: (rows per query tile = keys per KV tile, warps, dot precision).
_BWD = {
    torch.bfloat16: (64, 4, "tf32"),
    torch.float16: (64, 4, "tf32"),
    torch.float32: (32, 4, "tf32x3"),
}
_LOG2E = 1.4426950408889634
# Keys per split, in absolute positions: every path merges a query's per-split states in split
# order (module docstring). A multiple of every BLOCK_N.
SPLIT_KV = 256
# The split launch (automatic for small decode batches) only where sequences may span this many
# splits: its second launch costs more than it saves on shorter caches.
_MIN_SPLITS = 4
_SM_COUNT: dict = {}


@triton.jit
def _find_seq(pid, cu_ptr, num_seqs, TOKENS: tl.constexpr):
    """Sequence b whose tiles hold program `pid`: tiles of b start at cu[b] // TOKENS + b."""
    lo = 0
    hi = num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tl.load(cu_ptr + mid) // TOKENS + mid <= pid:
            lo = mid
        else:
            hi = mid
    return lo


@triton.jit
def _key_rows(b, kpos, kv_ok, q_start, paged, block_table_ptr, stride_bt, block_size, rows_per_block):
    """Row of each key position in the [rows, Hkv, D] view of k / v.

    A cache block is `rows_per_block` rows apart from the next (>= block_size: vLLM pages may
    hold the V block right after the K block)."""
    if paged:
        blk = tl.load(block_table_ptr + b * stride_bt + kpos // block_size, mask=kv_ok, other=0)
        krows = blk.to(tl.int64) * rows_per_block + kpos % block_size
    else:
        krows = (q_start + kpos).to(tl.int64)
    return krows


@triton.jit
def _load_q(q_ptr, tile, kv_head, q_start, num_q, first_pos, stride_qt, stride_qh, GROUP: tl.constexpr,
            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Query tile `tile` of a sequence: rows = (token, head of the kv group) -> q, positions, rows."""
    TOKENS: tl.constexpr = BLOCK_M // GROUP
    rows = tl.arange(0, BLOCK_M)
    tok = tile * TOKENS + rows // GROUP  # query index inside the sequence
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < TOKENS * GROUP) & (tok < num_q)
    d = tl.arange(0, BLOCK_D)
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    return q, first_pos + tok, head, row_ok, q_rows


@triton.jit
def _attend_split(q, q_pos, split, last_pos, k_ptr, v_ptr, block_table_ptr, b, kv_head, q_start, seq_len, qk_scale,
                  paged, block_size, rows_per_block, stride_kr, stride_kh, stride_vr, stride_vh, stride_bt,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, SPLIT: tl.constexpr):
    """Online-softmax state (m, l, acc) of the rows over the keys of split `split` alone, from
    an empty state. A row with no visible key there keeps (-inf, 0, 0): the `where` on m keeps
    exp2(-inf - -inf) (NaN) out, and changes nothing for any other row."""
    TILES: tl.constexpr = SPLIT // BLOCK_N
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    m_i = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for j in range(split * TILES, tl.minimum(last_pos // BLOCK_N + 1, (split + 1) * TILES)):
        kpos = j * BLOCK_N + tl.arange(0, BLOCK_N)
        kv_ok = kpos < seq_len
        krows = _key_rows(b, kpos, kv_ok, q_start, paged, block_table_ptr, stride_bt, block_size, rows_per_block)
        kv_mask = kv_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + krows[:, None] * stride_kr + kv_head * stride_kh + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
        visible = (kpos[None, :] <= q_pos[:, None]) & kv_ok[None, :]
        s = tl.where(visible, s * qk_scale, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + krows[:, None] * stride_vr + kv_head * stride_vh + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _merge(m_a, l_a, acc_a, m_b, l_b, acc_b):
    """State a (earlier splits) merged with split b. Explicit fma: the same rounding wherever it
    is compiled (the compiler may not pick which product to fuse). A row with b = (-inf, 0, 0)
    keeps a exactly (a's m is finite: split 0 always holds key 0)."""
    m = tl.maximum(m_a, m_b)
    scale_a = tl.exp2(m_a - m)
    scale_b = tl.exp2(m_b - m)
    return m, tl.fma(l_b, scale_b, l_a * scale_a), tl.fma(acc_b, scale_b[:, None], acc_a * scale_a[:, None])


@triton.jit
def _store_out(out_ptr, lse_ptr, m_i, l_i, acc, q_rows, head, mask, stride_ot, stride_oh, stride_lt,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, STORE_LSE: tl.constexpr):
    d = tl.arange(0, BLOCK_D)
    out = tl.div_rn(acc, l_i[:, None])
    tl.store(out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask[:, None] & (d[None, :] < HEAD_DIM))
    if STORE_LSE:  # natural log, as the contract states
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
        tl.store(lse_ptr + q_rows * stride_lt + head, lse, mask=mask)


@triton.jit
def _attend_tile(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, seq_lens_ptr, block_table_ptr, b, tile, kv_head, q_start,
                 num_q, qk_scale, paged, block_size, rows_per_block, stride_qt, stride_qh, stride_kr, stride_kh,
                 stride_vr, stride_vh, stride_ot, stride_oh, stride_lt, stride_bt, GROUP: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, STORE_LSE: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr):
    """Query tile `tile` (TOKENS tokens x the kv group's heads) of sequence b against its keys:
    split by split, each merged into the state of the ones before."""
    TOKENS: tl.constexpr = BLOCK_M // GROUP
    if paged:
        seq_len = tl.load(seq_lens_ptr + b)
    else:
        seq_len = num_q
    first_pos = seq_len - num_q  # absolute position of the first query
    q, q_pos, head, row_ok, q_rows = _load_q(q_ptr, tile, kv_head, q_start, num_q, first_pos, stride_qt, stride_qh,
                                             GROUP, HEAD_DIM, BLOCK_D, BLOCK_M)
    last_pos = first_pos + tl.minimum(num_q, (tile + 1) * TOKENS) - 1
    m_i, l_i, acc = _attend_split(q, q_pos, 0, last_pos, k_ptr, v_ptr, block_table_ptr, b, kv_head, q_start, seq_len,
                                  qk_scale, paged, block_size, rows_per_block, stride_kr, stride_kh, stride_vr,
                                  stride_vh, stride_bt, HEAD_DIM, BLOCK_D, PRECISION, BLOCK_M, BLOCK_N, SPLIT)
    for split in range(1, last_pos // SPLIT + 1):
        m_s, l_s, acc_s = _attend_split(q, q_pos, split, last_pos, k_ptr, v_ptr, block_table_ptr, b, kv_head, q_start,
                                        seq_len, qk_scale, paged, block_size, rows_per_block, stride_kr, stride_kh,
                                        stride_vr, stride_vh, stride_bt, HEAD_DIM, BLOCK_D, PRECISION, BLOCK_M,
                                        BLOCK_N, SPLIT)
        m_i, l_i, acc = _merge(m_i, l_i, acc, m_s, l_s, acc_s)
    _store_out(out_ptr, lse_ptr, m_i, l_i, acc, q_rows, head, row_ok, stride_ot, stride_oh, stride_lt, HEAD_DIM,
               BLOCK_D, STORE_LSE)


@triton.jit(do_not_specialize=["num_seqs", "paged", "block_size", "rows_per_block", "stride_bt"])
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, cu_q_ptr, seq_lens_ptr, block_table_ptr,
    num_seqs, qk_scale, paged, block_size, rows_per_block,
    stride_qt, stride_qh, stride_kr, stride_kh, stride_vr, stride_vh, stride_ot, stride_oh, stride_lt, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, STORE_LSE: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
    SEQ_MAJOR: tl.constexpr,  # program_id(0) = a sequence, walking its query tiles (decode batches);
                              # else = a query tile, found by a search over cu_q
):
    TOKENS: tl.constexpr = BLOCK_M // GROUP
    kv_head = tl.program_id(1)
    if SEQ_MAJOR:
        b = tl.program_id(0)
        q_start = tl.load(cu_q_ptr + b)
        num_q = tl.load(cu_q_ptr + b + 1) - q_start
        for tile in range(0, tl.cdiv(num_q, TOKENS)):
            _attend_tile(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, seq_lens_ptr, block_table_ptr, b, tile, kv_head,
                         q_start, num_q, qk_scale, paged, block_size, rows_per_block, stride_qt, stride_qh,
                         stride_kr, stride_kh, stride_vr, stride_vh, stride_ot, stride_oh, stride_lt, stride_bt,
                         GROUP, HEAD_DIM, BLOCK_D, STORE_LSE, PRECISION, BLOCK_M, BLOCK_N, SPLIT)
    else:
        pid = tl.program_id(0)
        b = _find_seq(pid, cu_q_ptr, num_seqs, TOKENS)
        q_start = tl.load(cu_q_ptr + b)
        num_q = tl.load(cu_q_ptr + b + 1) - q_start
        tile = pid - (q_start // TOKENS + b)
        if tile * TOKENS < num_q:
            _attend_tile(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, seq_lens_ptr, block_table_ptr, b, tile, kv_head,
                         q_start, num_q, qk_scale, paged, block_size, rows_per_block, stride_qt, stride_qh,
                         stride_kr, stride_kh, stride_vr, stride_vh, stride_ot, stride_oh, stride_lt, stride_bt,
                         GROUP, HEAD_DIM, BLOCK_D, STORE_LSE, PRECISION, BLOCK_M, BLOCK_N, SPLIT)


@triton.jit(do_not_specialize=["paged", "block_size", "rows_per_block", "stride_bt"])
def _split_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, cu_q_ptr, seq_lens_ptr,
    block_table_ptr, qk_scale, paged, block_size, rows_per_block,
    stride_qt, stride_qh, stride_kr, stride_kh, stride_vr, stride_vh, stride_ot, stride_oh, stride_lt, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, STORE_LSE: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
):
    # One program per (sequence, kv head, split): that split's state of every query row, stored
    # as a partial ([T, Hq, splits] m and l, [T, Hq, splits, BLOCK_D] acc). Split 0 also writes
    # the final output of rows whose keys all lie in it (nothing to merge).
    TOKENS: tl.constexpr = BLOCK_M // GROUP
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    max_splits = tl.num_programs(2)
    num_q_heads = tl.num_programs(1) * GROUP
    q_start = tl.load(cu_q_ptr + b)
    num_q = tl.load(cu_q_ptr + b + 1) - q_start
    if paged:
        seq_len = tl.load(seq_lens_ptr + b)
    else:
        seq_len = num_q
    first_pos = seq_len - num_q
    d = tl.arange(0, BLOCK_D)
    for tile in range(0, tl.cdiv(num_q, TOKENS)):
        last_pos = first_pos + tl.minimum(num_q, (tile + 1) * TOKENS) - 1
        if split <= last_pos // SPLIT:
            q, q_pos, head, row_ok, q_rows = _load_q(q_ptr, tile, kv_head, q_start, num_q, first_pos, stride_qt,
                                                     stride_qh, GROUP, HEAD_DIM, BLOCK_D, BLOCK_M)
            m_s, l_s, acc_s = _attend_split(q, q_pos, split, last_pos, k_ptr, v_ptr, block_table_ptr, b, kv_head,
                                            q_start, seq_len, qk_scale, paged, block_size, rows_per_block, stride_kr,
                                            stride_kh, stride_vr, stride_vh, stride_bt, HEAD_DIM, BLOCK_D, PRECISION,
                                            BLOCK_M, BLOCK_N, SPLIT)
            part = (q_rows * num_q_heads + head) * max_splits + split
            tl.store(part_m_ptr + part, m_s, mask=row_ok)
            tl.store(part_l_ptr + part, l_s, mask=row_ok)
            tl.store(part_acc_ptr + part[:, None] * BLOCK_D + d[None, :], acc_s, mask=row_ok[:, None])
            if split == 0:
                _store_out(out_ptr, lse_ptr, m_s, l_s, acc_s, q_rows, head, row_ok & (q_pos < SPLIT), stride_ot,
                           stride_oh, stride_lt, HEAD_DIM, BLOCK_D, STORE_LSE)


@triton.jit(do_not_specialize=["paged"])
def _merge_kernel(
    out_ptr, lse_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, cu_q_ptr, seq_lens_ptr, paged, stride_ot, stride_oh,
    stride_lt, max_splits, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    STORE_LSE: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT: tl.constexpr,
):
    # One program per (sequence, kv head): each row's partials merged in split order, as
    # _attend_tile merges them; rows with one split were written by _split_kernel.
    TOKENS: tl.constexpr = BLOCK_M // GROUP
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    num_q_heads = tl.num_programs(1) * GROUP
    q_start = tl.load(cu_q_ptr + b)
    num_q = tl.load(cu_q_ptr + b + 1) - q_start
    if paged:
        seq_len = tl.load(seq_lens_ptr + b)
    else:
        seq_len = num_q
    first_pos = seq_len - num_q
    rows = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    for tile in range(0, tl.cdiv(num_q, TOKENS)):
        last_pos = first_pos + tl.minimum(num_q, (tile + 1) * TOKENS) - 1
        if last_pos >= SPLIT:
            tok = tile * TOKENS + rows // GROUP
            head = kv_head * GROUP + rows % GROUP
            row_ok = (rows < TOKENS * GROUP) & (tok < num_q)
            q_pos = first_pos + tok
            q_rows = (q_start + tok).to(tl.int64)
            part = (q_rows * num_q_heads + head) * max_splits
            m_i = tl.load(part_m_ptr + part, mask=row_ok, other=0.0)
            l_i = tl.load(part_l_ptr + part, mask=row_ok, other=1.0)
            acc = tl.load(part_acc_ptr + part[:, None] * BLOCK_D + d[None, :], mask=row_ok[:, None], other=0.0)
            for split in range(1, last_pos // SPLIT + 1):
                # A row whose keys end before this split merges the empty state (an exact no-op),
                # as it does in _attend_tile.
                live = row_ok & (split <= q_pos // SPLIT)
                m_s = tl.load(part_m_ptr + part + split, mask=live, other=-float("inf"))
                l_s = tl.load(part_l_ptr + part + split, mask=live, other=0.0)
                acc_s = tl.load(part_acc_ptr + (part + split)[:, None] * BLOCK_D + d[None, :], mask=live[:, None],
                                other=0.0)
                m_i, l_i, acc = _merge(m_i, l_i, acc, m_s, l_s, acc_s)
            _store_out(out_ptr, lse_ptr, m_i, l_i, acc, q_rows, head, row_ok & (q_pos >= SPLIT), stride_ot,
                       stride_oh, stride_lt, HEAD_DIM, BLOCK_D, STORE_LSE)


@triton.jit
def _bwd_delta_kernel(o_ptr, do_ptr, delta_ptr, num_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      ROWS: tl.constexpr):
    # delta [T*Hq] = sum_d dO * O (fp32), rows of the contiguous [T*Hq, D] views.
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    d = tl.arange(0, BLOCK_D)
    mask = (r[:, None] < num_rows) & (d[None, :] < HEAD_DIM)
    offs = r[:, None].to(tl.int64) * HEAD_DIM + d[None, :]
    o = tl.load(o_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + r, tl.sum(o * do, axis=1), mask=r < num_rows)


@triton.jit
def _load_rows(ptr, q_start, tile, num_q, kv_head, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    """[ROWS, D] of a contiguous [T, Hq, D] tensor at rows (token, head of the kv group); + row indices."""
    TOKENS: tl.constexpr = ROWS // GROUP
    rows = tl.arange(0, ROWS)
    tok = tile * TOKENS + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < TOKENS * GROUP) & (tok < num_q)
    flat = (q_start + tok).to(tl.int64) * (GROUP * tl.num_programs(1)) + head  # row of [T*Hq]
    d = tl.arange(0, BLOCK_D)
    x = tl.load(ptr + flat[:, None] * HEAD_DIM + d[None, :], mask=row_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    return x, tok, row_ok, flat


@triton.jit
def _bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_ptr, num_seqs, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per (KV tile of BLOCK keys, kv head); q, k, v, do contiguous; lse, delta [T*Hq].
    TOKENS: tl.constexpr = BLOCK // GROUP
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    num_kv_heads = tl.num_programs(1)
    b = _find_seq(pid, cu_ptr, num_seqs, BLOCK)
    start = tl.load(cu_ptr + b)
    seq_len = tl.load(cu_ptr + b + 1) - start
    kv_tile = pid - (start // BLOCK + b)
    if kv_tile * BLOCK >= seq_len:
        return
    kpos = kv_tile * BLOCK + tl.arange(0, BLOCK)
    kv_ok = kpos < seq_len
    d = tl.arange(0, BLOCK_D)
    kv_mask = kv_ok[:, None] & (d[None, :] < HEAD_DIM)
    kv_offs = ((start + kpos).to(tl.int64) * num_kv_heads + kv_head)[:, None] * HEAD_DIM + d[None, :]
    k = tl.load(k_ptr + kv_offs, mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + kv_offs, mask=kv_mask, other=0.0)
    dk = tl.zeros((BLOCK, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK, BLOCK_D), tl.float32)
    # Query tiles that can see this KV tile: from the one holding position kpos[0] to the end.
    for q_tile in range((kv_tile * BLOCK) // TOKENS, tl.cdiv(seq_len, TOKENS)):
        q, tok, row_ok, flat = _load_rows(q_ptr, start, q_tile, seq_len, kv_head, GROUP, HEAD_DIM, BLOCK_D, BLOCK)
        do, _, _, _ = _load_rows(do_ptr, start, q_tile, seq_len, kv_head, GROUP, HEAD_DIM, BLOCK_D, BLOCK)
        lse2 = tl.load(lse_ptr + flat, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptr + flat, mask=row_ok, other=0.0)
        visible = (kpos[:, None] <= tok[None, :]) & kv_ok[:, None] & row_ok[None, :]  # [keys, rows]
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # [keys, rows]
        p_t = tl.where(visible, tl.exp2(s_t * qk_scale - lse2[None, :]), 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    tl.store(dk_ptr + kv_offs, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + kv_offs, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cu_ptr, num_seqs, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per (query tile of BLOCK rows, kv head).
    TOKENS: tl.constexpr = BLOCK // GROUP
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    num_kv_heads = tl.num_programs(1)
    b = _find_seq(pid, cu_ptr, num_seqs, TOKENS)
    start = tl.load(cu_ptr + b)
    seq_len = tl.load(cu_ptr + b + 1) - start
    q_tile = pid - (start // TOKENS + b)
    if q_tile * TOKENS >= seq_len:
        return
    q, tok, row_ok, flat = _load_rows(q_ptr, start, q_tile, seq_len, kv_head, GROUP, HEAD_DIM, BLOCK_D, BLOCK)
    do, _, _, _ = _load_rows(do_ptr, start, q_tile, seq_len, kv_head, GROUP, HEAD_DIM, BLOCK_D, BLOCK)
    lse2 = tl.load(lse_ptr + flat, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + flat, mask=row_ok, other=0.0)
    d = tl.arange(0, BLOCK_D)
    dq = tl.zeros((BLOCK, BLOCK_D), tl.float32)
    last_tok = tl.minimum(seq_len, (q_tile + 1) * TOKENS) - 1
    for j in range(0, last_tok // BLOCK + 1):
        kpos = j * BLOCK + tl.arange(0, BLOCK)
        kv_ok = kpos < seq_len
        kv_mask = kv_ok[:, None] & (d[None, :] < HEAD_DIM)
        kv_offs = ((start + kpos).to(tl.int64) * num_kv_heads + kv_head)[:, None] * HEAD_DIM + d[None, :]
        k = tl.load(k_ptr + kv_offs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_offs, mask=kv_mask, other=0.0)
        visible = (kpos[None, :] <= tok[:, None]) & kv_ok[None, :] & row_ok[:, None]  # [rows, keys]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        p = tl.where(visible, tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    tl.store(dq_ptr + flat[:, None] * HEAD_DIM + d[None, :], (dq * sm_scale).to(dq_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (d[None, :] < HEAD_DIM))


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, block_size, stride_kt, stride_vt,
                     stride_kcb, stride_kco, stride_vcb, stride_vco, ROW: tl.constexpr, BLOCK: tl.constexpr):
    # One program per token: its [Hkv, D] row (contiguous, ROW elements) -> the cache slot.
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    blk = slot // block_size
    off = slot % block_size
    offs = tl.arange(0, BLOCK)
    mask = offs < ROW
    k = tl.load(k_ptr + t * stride_kt + offs, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs, mask=mask)
    tl.store(kc_ptr + blk * stride_kcb + off * stride_kco + offs, k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + blk * stride_vcb + off * stride_vco + offs, v.to(vc_ptr.dtype.element_ty), mask=mask)


def _heads_view(t: torch.Tensor) -> torch.Tensor:
    """[R, H, D] with unit stride on D (copies only if needed)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_heads(q: torch.Tensor, num_kv_heads: int) -> int:
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    if q.dtype not in _FWD:
        raise ValueError(f"attention: q must be bf16, fp16 or fp32 on GPU, got {q.dtype}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"attention: Hq={num_q_heads} must be a multiple of Hkv={num_kv_heads}")
    group = num_q_heads // num_kv_heads
    if group > _BWD[q.dtype][0]:
        raise ValueError(f"attention: {group} query heads per kv head > {_BWD[q.dtype][0]} is not supported on GPU")
    if head_dim > 256:
        raise ValueError(f"attention: head_dim {head_dim} > 256 is not supported on GPU")
    return group


def _sm_count(device: torch.device) -> int:
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device]


def _launch_fwd(q, k_rows, v_rows, cu_q, seq_lens, block_table, block_size, scale, paged, lse, rows_per_block=None,
                out=None, decode=None, max_len=None, split=None):
    """`decode` (None = automatic: no more query tokens than sequences; a knob for tests) gives
    each program a whole sequence instead of a query tile. `split` (None = automatic: decode
    batches too small to fill the GPU, over caches of at least _MIN_SPLITS splits; needs
    `max_len`, a bound on any sequence's length) gives
    each split of SPLIT_KV keys its own program, then merges. Neither changes a bit."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_rows.shape[1]
    group = _check_heads(q, num_kv_heads)
    if k_rows.dtype != q.dtype or v_rows.dtype != q.dtype:
        raise ValueError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k_rows.dtype}, {v_rows.dtype}")
    if out is None:
        out = torch.empty_like(q)
    elif out.stride(-1) != 1:
        raise ValueError("attention: out must have unit stride on head_dim")
    num_seqs = cu_q.shape[0] - 1
    if num_tokens == 0 or num_seqs == 0:
        return out
    if decode is None:
        decode = num_tokens <= num_seqs
    max_splits = triton.cdiv(max_len, SPLIT_KV) if max_len else 0
    if split is None:
        split = decode and max_splits >= _MIN_SPLITS and 2 * num_seqs * num_kv_heads <= _sm_count(q.device)
    block_m, block_n, num_warps, precision = (_DECODE if decode or split else _FWD)[q.dtype]
    block_d = max(16, triton.next_power_of_2(head_dim))
    strides = (q.stride(0), q.stride(1), k_rows.stride(0), k_rows.stride(1), v_rows.stride(0), v_rows.stride(1),
               out.stride(0), out.stride(1), lse.stride(0) if lse is not None else 0, block_table.stride(0))
    lse_arg = lse if lse is not None else out
    meta = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, STORE_LSE=lse is not None, PRECISION=precision,
                BLOCK_M=block_m, BLOCK_N=block_n, SPLIT=SPLIT_KV)
    if split:
        if max_splits < 1:
            raise ValueError("attention: a split launch needs max_len, a bound on the sequences' lengths")
        part_m = torch.empty(num_tokens * num_q_heads * max_splits, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(part_m.numel() * block_d, dtype=torch.float32, device=q.device)
        _split_kernel[(num_seqs, num_kv_heads, max_splits)](
            q, k_rows, v_rows, out, lse_arg, part_m, part_l, part_acc, cu_q, seq_lens, block_table,
            scale * _LOG2E, int(paged), block_size, rows_per_block or block_size, *strides, **meta,
            num_warps=num_warps, num_stages=_DECODE_STAGES)
        _merge_kernel[(num_seqs, num_kv_heads)](
            out, lse_arg, part_m, part_l, part_acc, cu_q, seq_lens, int(paged), strides[6], strides[7], strides[8],
            max_splits, GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, STORE_LSE=lse is not None,
            BLOCK_M=block_m, SPLIT=SPLIT_KV, num_warps=num_warps)
        return out
    if decode:
        grid = (num_seqs, num_kv_heads)
    else:
        grid = (triton.cdiv(num_tokens, block_m // group) + num_seqs, num_kv_heads)
    _attention_kernel[grid](
        q, k_rows, v_rows, out, lse_arg, cu_q, seq_lens, block_table,
        num_seqs, scale * _LOG2E, int(paged), block_size, rows_per_block or block_size, *strides, **meta,
        SEQ_MAJOR=decode, num_warps=num_warps, num_stages=_DECODE_STAGES if decode else _FWD_STAGES)
    return out


def attention_varlen_fwd(q, k, v, cu_seqlens, scale: float, decode=None, split=False):
    """q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens int [B+1] -> (out [T, Hq, D], lse fp32 [T, Hq]).
    `split=True` (tests) takes the split launch, bounding lengths by T."""
    q, k, v = _heads_view(q), _heads_view(k), _heads_view(v)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    cu = cu_seqlens.to(torch.int32).contiguous()
    # seq_lens / block_table are not read in the varlen layout; any int32 tensors do.
    out = _launch_fwd(q, k, v, cu, cu, cu[None, :], 1, scale, False, lse, decode=decode, max_len=q.shape[0],
                      split=split)
    return out, lse


def attention_paged_fwd(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, scale: float, out=None,
                        decode=None, split=None):
    """q [T, Hq, D]; caches [NB, BS, Hkv, D]; block_table int [B, MB]; seq_lens [B]; cu_seqlens_q [B+1].
    Writes `out` [T, Hq, D] (new if None): the rows of the sequences' new tokens."""
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    row_stride = num_kv_heads * head_dim
    if k_cache.stride()[1:] != (row_stride, head_dim, 1) or k_cache.stride(0) % row_stride:
        raise ValueError("attention_paged: k_cache must be [NB, BS, Hkv, D] with contiguous rows inside each block")
    if v_cache.stride() != k_cache.stride():
        raise ValueError("attention_paged: v_cache must have k_cache's strides")
    # Blocks may sit further apart than block_size rows (vLLM pages: K block then V block).
    rows_per_block = k_cache.stride(0) // row_stride
    num_rows = (num_blocks - 1) * rows_per_block + block_size
    k_rows = k_cache.as_strided((num_rows, num_kv_heads, head_dim), (row_stride, head_dim, 1))
    v_rows = v_cache.as_strided((num_rows, num_kv_heads, head_dim), (row_stride, head_dim, 1))
    table = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
    return _launch_fwd(_heads_view(q), k_rows, v_rows, cu_seqlens_q.to(torch.int32).contiguous(),
                       seq_lens.to(torch.int32).contiguous(),
                       table.to(torch.int32), block_size, scale, True, None, rows_per_block, out, decode,
                       max_len=block_table.shape[1] * block_size, split=split)


def attention_varlen_bwd(grad_out, q, k, v, out, lse, cu_seqlens, scale: float):
    """-> (dq, dk, dv) in the dtypes of q, k, v; deterministic (no atomics)."""
    q, k, v, out, grad_out = (t.contiguous() for t in (q, k, v, out, grad_out))
    lse = lse.contiguous()
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = _check_heads(q, num_kv_heads)
    block, num_warps, precision = _BWD[q.dtype]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    num_seqs = cu_seqlens.shape[0] - 1
    if num_tokens == 0 or num_seqs == 0:
        return dq, dk, dv
    cu = cu_seqlens.to(torch.int32).contiguous()
    block_d = max(16, triton.next_power_of_2(head_dim))
    delta = torch.empty(num_tokens * num_q_heads, dtype=torch.float32, device=q.device)
    rows = 32
    _bwd_delta_kernel[(triton.cdiv(num_tokens * num_q_heads, rows),)](
        out, grad_out, delta, num_tokens * num_q_heads, HEAD_DIM=head_dim, BLOCK_D=block_d, ROWS=rows, num_warps=4)
    meta = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, PRECISION=precision, BLOCK=block,
                num_warps=num_warps, num_stages=_BWD_STAGES)
    args = (num_seqs, scale * _LOG2E, scale)
    _bwd_dkdv_kernel[(triton.cdiv(num_tokens, block) + num_seqs, num_kv_heads)](
        q, k, v, grad_out, lse, delta, dk, dv, cu, *args, **meta)
    _bwd_dq_kernel[(triton.cdiv(num_tokens, block // group) + num_seqs, num_kv_heads)](
        q, k, v, grad_out, lse, delta, dq, cu, *args, **meta)
    return dq, dk, dv


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping) -> None:
    """In place: cache[s // BS, s % BS] = k[t] (cast to the cache dtype) for s = slot_mapping[t] >= 0."""
    num_tokens, num_kv_heads, head_dim = k.shape
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.stride(-1) != 1 or cache.stride(2) != head_dim:
            raise ValueError(f"write_kv_cache: {name} must hold each [Hkv, D] slot contiguously")
    k = k if k.stride(-1) == 1 and k.stride(1) == head_dim else k.contiguous()
    v = v if v.stride(-1) == 1 and v.stride(1) == head_dim else v.contiguous()
    if num_tokens == 0:
        return
    row = num_kv_heads * head_dim
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping.contiguous(), k_cache.shape[1], k.stride(0), v.stride(0),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        ROW=row, BLOCK=triton.next_power_of_2(row), num_warps=4)
