"""log-softmax and per-token logprobs over the vocab on NVIDIA GPUs, fp32, one pass for the sum.

One program per row (README.md):
  z = logits.float() / temperature (correctly rounded division),
  per TILE_V=256 tile t: m_t = max(z in t), s_t = one `tl.sum` of exp(z - m_t) (the same pass),
  m = max_t m_t (exact), s = the tiles' s_t * exp(m_t - m) folded in the balanced tree of
      `lockstep.kernels._tree.tree_fold` (leaves in a perfect tree of next_pow2(num_tiles) slots,
      empty slots zero, then pairwise sums level by level),
logp = (z - m) - log(s). token_logprobs reads the logits once; log_softmax twice (it writes).
token_logprobs' backward recomputes (m, log s) the same way, then writes
  dlogits = (onehot(id) * g - exp(logp) * g) / temperature   (two reads, one write per row; no atomics).
A vocab shard of whole tiles sums a subtree once it knows m (vocab parallel: all-reduce the max,
which is exact, then gather the subtree sums).
"""

import functools

import torch
import triton
import triton.language as tl

from lockstep.kernels._tree import _leaf_slots
from lockstep.kernels.logprobs import TILE_V  # one tile size for both devices (vocab shards)

_TILES_PER_STEP = 16  # tiles loaded per loop step: [16, 256]


@functools.cache
def _slot_table(num_tiles: int, device: torch.device) -> torch.Tensor:
    """int32 [num_tiles]: the slot of each tile in the perfect tree of next_pow2(num_tiles)."""
    return torch.tensor(_leaf_slots(num_tiles), dtype=torch.int32, device=device)


@triton.jit
def _row_stats(x_ptr, slot_ptr, scratch_ptr, V, temperature, NUM_TILES: tl.constexpr,
               NUM_SLOTS: tl.constexpr, LOG_SLOTS: tl.constexpr, TILE: tl.constexpr, STEP: tl.constexpr):
    """-> (m, log(s)) of row `x_ptr` [V]; `scratch_ptr` [2 * NUM_SLOTS] fp32 is this row's own:
    the tiles' maxima, then their sums, each at the tile's slot of the perfect tree."""
    all_slots = tl.arange(0, NUM_SLOTS)
    tl.store(scratch_ptr + all_slots, tl.full((NUM_SLOTS,), -float("inf"), tl.float32))  # empty slots
    tl.store(scratch_ptr + NUM_SLOTS + all_slots, tl.zeros((NUM_SLOTS,), tl.float32))
    tl.debug_barrier()  # the fill lands before any tile's values
    tiles = tl.arange(0, STEP)
    cols = tl.arange(0, TILE)
    for t0 in range(0, NUM_TILES, STEP):
        offs = (t0 + tiles)[:, None] * TILE + cols[None, :]
        z = tl.div_rn(tl.load(x_ptr + offs, mask=offs < V, other=-float("inf")).to(tl.float32), temperature)
        tile_max = tl.max(z, axis=1)  # [STEP]
        shift = tl.where(tile_max == -float("inf"), 0.0, tile_max)  # an all -inf tile sums to 0, not NaN
        tile_sum = tl.sum(tl.exp(z - shift[:, None]), axis=1)  # padding adds exp(-inf) = 0
        tile_ok = t0 + tiles < NUM_TILES
        slots = tl.load(slot_ptr + t0 + tiles, mask=tile_ok, other=0)
        tl.store(scratch_ptr + slots, tile_max, mask=tile_ok)
        tl.store(scratch_ptr + NUM_SLOTS + slots, tile_sum, mask=tile_ok)
    tl.debug_barrier()  # the scratch writes above are read back by other threads below
    maxima = tl.load(scratch_ptr + all_slots)
    m = tl.max(maxima, axis=0)
    s = tl.load(scratch_ptr + NUM_SLOTS + all_slots) * tl.exp(maxima - m)  # empty slots: 0 * 0
    for level in tl.static_range(LOG_SLOTS):  # perfect tree: pairwise, level by level
        s = tl.sum(tl.reshape(s, (NUM_SLOTS >> (level + 1), 2)), axis=1)
    return m, tl.log(tl.sum(s, axis=0))  # s has one element here


@triton.jit
def _log_softmax_kernel(x_ptr, out_ptr, slot_ptr, scratch_ptr, V, temperature, stride_x, stride_out,
                        NUM_TILES: tl.constexpr, NUM_SLOTS: tl.constexpr, LOG_SLOTS: tl.constexpr, TILE: tl.constexpr,
                        STEP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    m, log_s = _row_stats(x_row, slot_ptr, scratch_ptr + row * (2 * NUM_SLOTS), V, temperature,
                          NUM_TILES, NUM_SLOTS, LOG_SLOTS, TILE, STEP)
    for v0 in range(0, V, TILE * STEP):
        offs = v0 + tl.arange(0, TILE * STEP)
        z = tl.div_rn(tl.load(x_row + offs, mask=offs < V, other=0.0).to(tl.float32), temperature)
        tl.store(out_ptr + row * stride_out + offs, (z - m) - log_s, mask=offs < V)


@triton.jit
def _token_logprobs_kernel(x_ptr, ids_ptr, out_ptr, slot_ptr, scratch_ptr, V, temperature, stride_x,
                           NUM_TILES: tl.constexpr, NUM_SLOTS: tl.constexpr, LOG_SLOTS: tl.constexpr, TILE: tl.constexpr,
                        STEP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    m, log_s = _row_stats(x_row, slot_ptr, scratch_ptr + row * (2 * NUM_SLOTS), V, temperature,
                          NUM_TILES, NUM_SLOTS, LOG_SLOTS, TILE, STEP)
    token = tl.load(ids_ptr + row).to(tl.int64)
    z = tl.div_rn(tl.load(x_row + token).to(tl.float32), temperature)
    tl.store(out_ptr + row, (z - m) - log_s)


@triton.jit
def _token_logprobs_bwd_kernel(grad_ptr, x_ptr, ids_ptr, out_ptr, slot_ptr, scratch_ptr, V, temperature, stride_x,
                               stride_out, NUM_TILES: tl.constexpr, NUM_SLOTS: tl.constexpr, LOG_SLOTS: tl.constexpr,
                               TILE: tl.constexpr, STEP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    m, log_s = _row_stats(x_row, slot_ptr, scratch_ptr + row * (2 * NUM_SLOTS), V, temperature,
                          NUM_TILES, NUM_SLOTS, LOG_SLOTS, TILE, STEP)
    g = tl.load(grad_ptr + row).to(tl.float32)
    token = tl.load(ids_ptr + row).to(tl.int64)
    for v0 in range(0, V, TILE * STEP):
        offs = v0 + tl.arange(0, TILE * STEP)
        z = tl.div_rn(tl.load(x_row + offs, mask=offs < V, other=0.0).to(tl.float32), temperature)
        gz = -(tl.exp((z - m) - log_s) * g)
        gz = tl.where(offs == token, gz + g, gz)
        dx = tl.div_rn(gz, temperature)
        tl.store(out_ptr + row * stride_out + offs, dx.to(out_ptr.dtype.element_ty), mask=offs < V)


def _prepare(logits2d: torch.Tensor, temperature: float):
    if logits2d.dim() != 2 or logits2d.shape[1] == 0:
        raise ValueError(f"logprobs: logits2d must be [T, V] with V > 0, got {tuple(logits2d.shape)}")
    if not temperature > 0:
        raise ValueError(f"logprobs: temperature must be > 0, got {temperature}")
    logits2d = logits2d if logits2d.stride(1) == 1 else logits2d.contiguous()
    num_tiles = triton.cdiv(logits2d.shape[1], TILE_V)
    num_slots = triton.next_power_of_2(num_tiles)
    scratch = torch.empty((logits2d.shape[0], 2 * num_slots), dtype=torch.float32, device=logits2d.device)
    meta = dict(NUM_TILES=num_tiles, NUM_SLOTS=num_slots, LOG_SLOTS=num_slots.bit_length() - 1, TILE=TILE_V, STEP=_TILES_PER_STEP, num_warps=8,
                # No fused multiply-add: the compiler fuses differently around the shared
                # row statistics in each kernel, and the kernels must agree bit for bit.
                enable_fp_fusion=False)
    return logits2d, _slot_table(num_tiles, logits2d.device), scratch, meta


def log_softmax_fwd(logits2d: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits [T, V] -> fp32 [T, V] = log_softmax(logits.float() / temperature)."""
    logits2d, slots, scratch, meta = _prepare(logits2d, temperature)
    out = torch.empty(logits2d.shape, dtype=torch.float32, device=logits2d.device)
    if logits2d.shape[0]:
        _log_softmax_kernel[(logits2d.shape[0],)](logits2d, out, slots, scratch, logits2d.shape[1], float(temperature),
                                                  logits2d.stride(0), out.stride(0), **meta)
    return out


def token_logprobs_fwd(logits2d: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits [T, V], ids int [T] -> fp32 [T]: log_softmax(...)[t, ids[t]]."""
    logits2d, slots, scratch, meta = _prepare(logits2d, temperature)
    if ids.shape != (logits2d.shape[0],):
        raise ValueError(f"token_logprobs: ids must be [T={logits2d.shape[0]}], got {tuple(ids.shape)}")
    out = torch.empty(logits2d.shape[0], dtype=torch.float32, device=logits2d.device)
    if logits2d.shape[0]:
        _token_logprobs_kernel[(logits2d.shape[0],)](logits2d, ids.contiguous(), out, slots, scratch, logits2d.shape[1],
                                                     float(temperature), logits2d.stride(0), **meta)
    return out


def token_logprobs_bwd(grad: torch.Tensor, logits2d: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """d/dlogits of sum(grad * token_logprobs(logits, ids)): [T, V] in the logits' dtype."""
    logits2d, slots, scratch, meta = _prepare(logits2d, temperature)
    if ids.shape != (logits2d.shape[0],) or grad.shape != (logits2d.shape[0],):
        raise ValueError(f"token_logprobs backward: ids and grad must be [T={logits2d.shape[0]}], "
                         f"got {tuple(ids.shape)} and {tuple(grad.shape)}")
    out = torch.empty(logits2d.shape, dtype=logits2d.dtype, device=logits2d.device)
    if logits2d.shape[0]:
        _token_logprobs_bwd_kernel[(logits2d.shape[0],)](grad.contiguous(), logits2d, ids.contiguous(), out, slots,
                                                         scratch, logits2d.shape[1], float(temperature),
                                                         logits2d.stride(0), out.stride(0), **meta)
    return out
