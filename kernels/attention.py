"""Causal GQA attention over packed sequences (varlen) and over a paged KV cache.

Both go through one routine, `_attend`: a query at absolute position t of its sequence walks
KV tiles [j*TILE_KV, (j+1)*TILE_KV) aligned to absolute key positions, in increasing j, with
an fp32 online softmax; a tile with no visible key leaves the state untouched (`where`);
hidden scores are replaced (not multiplied) and hidden values zeroed by `where`, so garbage
or NaN in a paged cache cannot leak.
So the output for the query at position t is the same bits in a full prefill, a chunked
prefill and a one-token decode, whatever the batch and the block order.
Varlen is the paged case with block size 1: key p of sequence b is row cu_seqlens[b] + p.
"""

import torch
from torch import Tensor

from lockstep.kernels._dispatch import op, triton_fn
from lockstep.kernels._math import det_exp, det_log
from lockstep.kernels._tree import tiled_sum, tree_fold

TILE_KV = 32
TILE_D = 32  # tile of the q.k dot product over head_dim
_QUERIES_PER_CHUNK = 128


def _attend(q: Tensor, q_seq: Tensor, q_pos: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
            scale: float):
    """The shared core.

    q [T, Hq, D]; q_seq, q_pos int64 [T] (sequence index, absolute position);
    k_cache, v_cache [NB, BS, Hkv, D]; block_table int [B, MB] (key p of seq b lives at
    block block_table[b, p // BS], offset p % BS). Returns out [T, Hq, D] (q dtype), lse fp32 [T, Hq].
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    out = torch.empty_like(q)
    lse = torch.empty(num_tokens, num_q_heads, dtype=torch.float32, device=q.device)
    offsets = torch.arange(TILE_KV, device=q.device)
    block_table = block_table.long()
    # Chunks of queries at similar positions walk the same number of tiles; any grouping
    # gives the same bits, this one only saves work.
    order = torch.argsort(q_pos, stable=True)
    for c0 in range(0, num_tokens, _QUERIES_PER_CHUNK):
        rows = order[c0 : c0 + _QUERIES_PER_CHUNK]
        n = rows.shape[0]
        pos, seq = q_pos[rows], q_seq[rows]
        q_t = q[rows].float().reshape(n, num_kv_heads, group, head_dim)
        q_t = q_t.permute(3, 0, 1, 2)[..., None]  # [D, n, Hkv, G, 1]
        m = torch.full((n, num_kv_heads, group), -torch.inf, device=q.device)
        l = torch.zeros(n, num_kv_heads, group, device=q.device)
        acc = torch.zeros(n, num_kv_heads, group, head_dim, device=q.device)
        for j in range(int(pos.max()) // TILE_KV + 1):
            key_pos = j * TILE_KV + offsets  # [TILE]
            visible = key_pos[None, :] <= pos[:, None]  # [n, TILE]
            col = (key_pos // block_size).clamp(max=block_table.shape[1] - 1)
            blk = block_table[seq[:, None], col[None, :]].clamp(0, num_blocks - 1)  # [n, TILE]
            off = (key_pos % block_size)[None, :].expand(n, -1)
            zero = torch.zeros((), device=q.device)
            k_t = k_cache[blk, off].float()  # [n, TILE, Hkv, D]; hidden scores are masked below
            v_t = torch.where(visible[..., None, None], v_cache[blk, off].float(), zero)  # 0 * NaN would leak
            k_t = k_t.permute(3, 0, 2, 1)[:, :, :, None, :]  # [D, n, Hkv, 1, TILE]
            s = tiled_sum(q_t * k_t, dim=0, tile=TILE_D) * scale  # [n, Hkv, G, TILE]
            vis = visible[:, None, None, :]
            s = torch.where(vis, s, -torch.inf)
            m_new = torch.maximum(m, s.amax(dim=-1))
            alpha = det_exp(m - m_new)
            p = torch.where(vis, det_exp(s - m_new[..., None]), zero)  # [n, Hkv, G, TILE]
            l_new = l * alpha + tiled_sum(p, dim=-1, tile=TILE_KV)
            pv = p.permute(3, 0, 1, 2)[..., None] * v_t.permute(1, 0, 2, 3)[:, :, :, None, :]  # [TILE, n, Hkv, G, D]
            acc_new = acc * alpha[..., None] + tiled_sum(pv, dim=0, tile=TILE_KV)
            any_visible = visible.any(dim=-1)[:, None, None]  # [n, 1, 1]
            m = torch.where(any_visible, m_new, m)
            l = torch.where(any_visible, l_new, l)
            acc = torch.where(any_visible[..., None], acc_new, acc)
        out[rows] = (acc / l[..., None]).reshape(n, num_q_heads, head_dim).to(q.dtype)
        lse[rows] = (m + det_log(l)).reshape(n, num_q_heads)
    return out, lse


def _varlen_layout(cu_seqlens: Tensor, num_tokens: int):
    """-> (q_seq [T], q_pos [T], block_table [B, max_len]) for packed sequences."""
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    num_seqs = lens.shape[0]
    q_seq = torch.repeat_interleave(torch.arange(num_seqs, device=cu.device), lens)
    q_pos = torch.arange(num_tokens, device=cu.device) - cu[:-1][q_seq]
    max_len = int(lens.max()) if num_seqs else 1
    block_table = cu[:-1, None] + torch.arange(max(max_len, 1), device=cu.device)[None, :]
    return q_seq, q_pos, block_table.clamp(max=max(num_tokens - 1, 0))


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or q.shape[::2] != k.shape[::2]:
        shapes = f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        raise ValueError(f"attention: q [T, Hq, D], k and v [T, Hkv, D] expected, got {shapes}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"attention: Hq={q.shape[1]} must be a multiple of Hkv={k.shape[1]}")


def _check_cu(cu_seqlens: Tensor, num_tokens: int, name: str) -> None:
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"attention: {name} must be int [B+1], got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device.type == "cpu":
        rising = bool((cu_seqlens[1:] >= cu_seqlens[:-1]).all())
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != num_tokens or not rising:
            raise ValueError(f"attention: {name} must rise from 0 to T={num_tokens}, got {cu_seqlens.tolist()}")


def attention_varlen_reference(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float):
    """q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens [B+1] -> (out [T, Hq, D], lse fp32 [T, Hq])."""
    if q.shape[0] == 0:
        return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=torch.float32)
    q_seq, q_pos, block_table = _varlen_layout(cu_seqlens, q.shape[0])
    return _attend(q, q_seq, q_pos, k[:, None], v[:, None], block_table, scale)


def attention_paged_reference(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, scale: float) -> Tensor:
    """The new tokens of seq b are its last cu_seqlens_q[b+1]-cu_seqlens_q[b] positions."""
    if q.shape[0] == 0:
        return torch.empty_like(q)
    cu = cu_seqlens_q.long()
    num_new = cu[1:] - cu[:-1]
    if bool((num_new > seq_lens.long()).any()):
        raise ValueError("attention_paged: a sequence has more new tokens than seq_lens; seq_lens must include them")
    capacity = block_table.shape[1] * k_cache.shape[1]
    if int(seq_lens.max()) > capacity:
        raise ValueError(f"attention_paged: seq_lens up to {int(seq_lens.max())} but block_table holds {capacity} slots")
    q_seq = torch.repeat_interleave(torch.arange(num_new.shape[0], device=q.device), num_new)
    q_pos = torch.arange(q.shape[0], device=q.device) - cu[:-1][q_seq] + (seq_lens.long() - num_new)[q_seq]
    return _attend(q, q_seq, q_pos, k_cache, v_cache, block_table, scale)[0]


def _tile_grads(q_i, do_i, lse_i, delta_i, k_j, v_j, i0: int, j0: int, scale: float):
    """Gradients from one KV tile (keys j0..) for one query chunk (positions i0..).

    q_i, do_i [n, Hkv, G, D], lse_i, delta_i [n, Hkv, G], k_j, v_j [tile, Hkv, D]
    -> dq_i [n, Hkv, G, D], dk_j, dv_j [tile, Hkv, D].
    """
    n, num_kv_heads, group, head_dim = q_i.shape
    tile = k_j.shape[0]
    zero = torch.zeros((), device=q_i.device)
    key_pos = torch.arange(j0, j0 + tile, device=q_i.device)
    visible = (key_pos[None, :] <= torch.arange(i0, i0 + n, device=q_i.device)[:, None])[:, None, None, :]
    k_t = k_j.permute(2, 1, 0)[:, None, :, None, :]  # [D, 1, Hkv, 1, tile]
    v_t = v_j.permute(2, 1, 0)[:, None, :, None, :]
    s = tiled_sum(q_i.permute(3, 0, 1, 2)[..., None] * k_t, dim=0, tile=TILE_D) * scale  # [n, Hkv, G, tile]
    p = torch.where(visible, det_exp(torch.where(visible, s - lse_i[..., None], zero)), zero)
    dp = tiled_sum(do_i.permute(3, 0, 1, 2)[..., None] * v_t, dim=0, tile=TILE_D)
    ds = p * (dp - delta_i[..., None]) * scale
    # dq_i = sum_j ds_ij k_j ; dk_j = sum_(i,g) ds_ij q_i ; dv_j = sum_(i,g) p_ij dO_i
    dq_i = tiled_sum(ds.permute(3, 0, 1, 2)[..., None] * k_j[:, None, :, None, :], dim=0, tile=TILE_KV)
    rows = n * group
    ds_t = ds.permute(0, 2, 3, 1).reshape(rows, tile, num_kv_heads, 1)  # [(n, G), tile, Hkv, 1]
    p_t = p.permute(0, 2, 3, 1).reshape(rows, tile, num_kv_heads, 1)
    q_r = q_i.permute(0, 2, 1, 3).reshape(rows, 1, num_kv_heads, head_dim)
    do_r = do_i.permute(0, 2, 1, 3).reshape(rows, 1, num_kv_heads, head_dim)
    dk_j = tiled_sum(ds_t * q_r, dim=0, tile=TILE_KV)
    dv_j = tiled_sum(p_t * do_r, dim=0, tile=TILE_KV)
    return dq_i, dk_j, dv_j


def attention_varlen_backward_reference(grad_out, q, k, v, out, lse, cu_seqlens, scale: float):
    """Flash-style backward: recompute P per KV tile from lse; fixed-order sums, no atomics.

    Memory is bounded by one (query chunk, KV tile) pair. Returns (dq, dk, dv) in the
    dtypes of q, k, v.
    """
    num_q_heads, head_dim = q.shape[1:]
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    cu = cu_seqlens.long().tolist()
    for start, end in zip(cu[:-1], cu[1:]):
        seq_len = end - start
        qs = q[start:end].float().reshape(seq_len, num_kv_heads, group, head_dim)
        dos = grad_out[start:end].float().reshape(qs.shape)
        lses = lse[start:end].reshape(seq_len, num_kv_heads, group)
        delta = tiled_sum((dos * out[start:end].float().reshape(qs.shape)).movedim(-1, 0), dim=0, tile=TILE_D)
        for j0 in range(0, seq_len, TILE_KV):
            j1 = min(j0 + TILE_KV, seq_len)
            k_j, v_j = k[start + j0 : start + j1].float(), v[start + j0 : start + j1].float()
            dk_parts, dv_parts = [], []
            for i0 in range(j0, seq_len, _QUERIES_PER_CHUNK):  # earlier queries see none of the tile
                i1 = min(i0 + _QUERIES_PER_CHUNK, seq_len)
                rows = slice(i0, i1)
                dq_i, dk_j, dv_j = _tile_grads(qs[rows], dos[rows], lses[rows], delta[rows], k_j, v_j, i0, j0, scale)
                dq[start + i0 : start + i1] += dq_i.reshape(-1, num_q_heads, head_dim)
                dk_parts.append(dk_j)
                dv_parts.append(dv_j)
            dk[start + j0 : start + j1] = tree_fold(dk_parts)
            dv[start + j0 : start + j1] = tree_fold(dv_parts)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@op("attention_varlen", mutates_args=())
def _attention_varlen_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    _check_qkv(q, k, v)
    _check_cu(cu_seqlens, q.shape[0], "cu_seqlens")
    fn = triton_fn("attention", "attention_varlen_fwd") if q.is_cuda else None
    if fn is None:
        return attention_varlen_reference(q, k, v, cu_seqlens, scale)
    return fn(q, k, v, cu_seqlens, scale)


@_attention_varlen_op.register_fake
def _(q, k, v, cu_seqlens, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=torch.float32)


def _setup(ctx, inputs, output):
    q, k, v, cu_seqlens, scale = inputs
    ctx.save_for_backward(q, k, v, cu_seqlens, *output)
    ctx.scale = scale


@op("attention_varlen_backward", mutates_args=())
def _attention_varlen_backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    fn = triton_fn("attention", "attention_varlen_bwd") if q.is_cuda else None
    return (fn or attention_varlen_backward_reference)(grad_out.contiguous(), q, k, v, out, lse, cu_seqlens, scale)


@_attention_varlen_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _backward(ctx, grad_out, grad_lse):
    # lse is an auxiliary output for the backward; it carries no gradient.
    q, k, v, cu_seqlens, out, lse = ctx.saved_tensors
    dq, dk, dv = _attention_varlen_backward_op(grad_out, q, k, v, out, lse, cu_seqlens, ctx.scale)
    return dq, dk, dv, None, None


_attention_varlen_op.register_autograd(_backward, setup_context=_setup)


@op("attention_paged", mutates_args=("out",))
def _attention_paged_op(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor, cu_seqlens_q: Tensor,
    scale: float, out: Tensor,
) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[-1] != q.shape[-1]:
        want = f"[NB, BS, Hkv, D={q.shape[-1]}]"
        raise ValueError(f"attention_paged: k_cache and v_cache must be {want}, got {tuple(k_cache.shape)}")
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"attention_paged: Hq={q.shape[1]} must be a multiple of Hkv={k_cache.shape[2]}")
    if out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"attention_paged: out must be {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
    _check_cu(cu_seqlens_q, q.shape[0], "cu_seqlens_q")
    num_seqs = cu_seqlens_q.shape[0] - 1
    if seq_lens.shape != (num_seqs,) or block_table.dim() != 2 or block_table.shape[0] != num_seqs:
        shapes = f"seq_lens {tuple(seq_lens.shape)}, block_table {tuple(block_table.shape)}"
        raise ValueError(f"attention_paged: seq_lens must be [B={num_seqs}] and block_table [B, MB], got {shapes}")
    fn = triton_fn("attention", "attention_paged_fwd") if q.is_cuda else None
    if fn is None:
        out.copy_(attention_paged_reference(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, scale))
    else:
        fn(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, scale, out=out)


def attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float) -> Tensor:
    """Causal GQA over packed sequences: q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens int [B+1] -> [T, Hq, D]."""
    return _attention_varlen_op(q, k, v, cu_seqlens, float(scale))[0]


def attention_paged(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, scale: float,
                    out: Tensor | None = None) -> Tensor:
    """Same math over a paged cache [NB, BS, Hkv, D] (inference only: no backward).

    q [T, Hq, D] holds the new tokens of each sequence, which are its LAST
    cu_seqlens_q[b+1]-cu_seqlens_q[b] positions; seq_lens[b] counts them, and their K/V
    are already written (`write_kv_cache`). Writes `out` (e.g. vLLM's output buffer; new if
    None) and returns it; rows of q past cu_seqlens_q[-1] (padding) are not written.
    """
    out = torch.empty_like(q) if out is None else out
    _attention_paged_op(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, float(scale), out)
    return out
