"""Batch-invariant linear on NVIDIA GPUs: out[M, N] = x[M, K] @ w[N, K]^T, fp32 accumulation.

The arithmetic of one output element is fixed by K and the dtype alone (never by M, the grid,
the strides, or a run):
  * K is cut into `num_chains(K)` equal chains (1, 2 or 4). Inside a chain, BLOCK_K-wide slices
    are accumulated in increasing k by `tl.dot` into an fp32 accumulator that starts at zero.
  * The chain partials are added in README.md's balanced tree: c0+c1, (c0+c1)+(c2+c3).
num_chains(K) = 2**min(2, number of factors 2 in K/1024) (1 if 1024 does not divide K). When
K/1024 has at most two factors 2 (Qwen3: K = 2048, 4096, 6144, 12288), a shard of K/S columns
(S = 2 or 4, S <= num_chains) has num_chains/S chains of the same length, i.e. it computes
exactly a subtree, so `tree_combine` of the S shard partials equals the unsplit result bit for
bit (tensor parallel over K). The GPU does not walk the TILE_K=32 tree of the CPU reference
all the way down: each pending node of that tree is a 128x128 fp32 tile, and a third one held in
registers already spills inside the k loop (ptxas, sm_90); with 4 chains, c0+c1 waits in a
per-program scratch tile instead.

What M changes is only who computes what: with few output tiles (decode) each chain runs in its
own program and writes an fp32 partial, and a second kernel adds them in the same tree; with many
tiles persistent programs walk all chains of a tile. Loads go through TMA when the operands'
layout allows it (K-major or transposed views, 16-byte aligned), else through pointers. None of
these choices changes a bit of the result (tests/kernels/test_triton_linear.py checks it).
"""

import ctypes
import functools
import os

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors (triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: pointer loads only
    TensorDescriptor = None

# One tile config per dtype, for every M: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps).
_CONFIGS = {
    torch.bfloat16: (128, 128, 64, 8),
    torch.float16: (128, 128, 64, 8),
    torch.float32: (64, 64, 32, 8),  # exact fp32 products (ieee), used by tests and fp32 models
}
CHAIN_UNIT = 1024  # a chain is a multiple of this many columns
MAX_CHAINS = 4
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")  # CPU interpreter: no inline asm
_MAX_PARK_BYTES = 256 << 20  # scratch for c0+c1 with 4 chains (one fp32 tile per output tile)


def num_chains(k: int) -> int:
    """The largest power of two <= MAX_CHAINS dividing K / CHAIN_UNIT (1 if CHAIN_UNIT does not divide K)."""
    if k % CHAIN_UNIT:
        return 1
    n, chains = k // CHAIN_UNIT, 1
    while chains < MAX_CHAINS and n % (2 * chains) == 0:
        chains *= 2
    return chains


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@triton.jit
def _tile_ids(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped raster over output tiles so neighbouring programs share operand tiles in L2.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (tile // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile % num_pid_in_group) % group_size_m
    pid_n = (tile % num_pid_in_group) // group_size_m
    return pid_m * BLOCK_M, pid_n * BLOCK_N


@triton.jit
def _chain(x, w, off_m, off_n, k_start, num_k_tiles, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
           EVEN_K: tl.constexpr, USE_TMA: tl.constexpr, X_T: tl.constexpr, W_T: tl.constexpr,
           PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One chain: the fp32 sum over BLOCK_K slices k_start, k_start + BLOCK_K, ... starting from zero."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if USE_TMA:  # out-of-bounds rows/columns of a box read as zeros
        for t in range(num_k_tiles):
            k = k_start + t * BLOCK_K
            if X_T:
                a = x.load([k, off_m]).T
            else:
                a = x.load([off_m, k])
            if W_T:
                b = w.load([k, off_n])
            else:
                b = w.load([off_n, k]).T
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_n = offs_n < N
        ks = (offs_k + k_start).to(tl.int64)
        x_ptrs = x + offs_m[:, None].to(tl.int64) * stride_xm + ks[None, :] * stride_xk
        w_ptrs = w + offs_n[None, :].to(tl.int64) * stride_wn + ks[:, None] * stride_wk
        for t in range(num_k_tiles):
            if EVEN_K:
                a = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
                b = tl.load(w_ptrs, mask=mask_n[None, :], other=0.0)
            else:
                k_left = K - k_start - t * BLOCK_K
                a = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
                b = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _store_tile(out_ptr, acc, off_m, off_n, M, N, stride_om, bias_ptr, HAS_BIAS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # out is row-major with unit column stride; in-tile offsets stay 32-bit (fewer registers).
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    if HAS_BIAS:  # added once, after the tree, in fp32
        acc = acc + tl.load(bias_ptr + off_n + cols, mask=cols < N - off_n, other=0.0).to(tl.float32)[None, :]
    base = out_ptr + off_m.to(tl.int64) * stride_om + off_n
    mask = (rows[:, None] < M - off_m) & (cols[None, :] < N - off_n)
    tl.store(base + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _linear_kernel(
    x, w, bias_ptr, out_ptr, scratch_ptr,
    M, N, K, chain_k,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_oc, stride_om,
    NUM_CHAINS: tl.constexpr,  # chains K is cut into (1, 2 or 4)
    SPLIT: tl.constexpr,  # one program per (tile, chain = program_id(1)); writes fp32 partials
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no K mask (pointer loads only)
    USE_TMA: tl.constexpr,  # x, w are tensor descriptors (else plain pointers with strides)
    X_T: tl.constexpr,  # TMA only: x's descriptor is over x.t() [K, M]
    W_T: tl.constexpr,  # TMA only: w's descriptor is over w.t() [K, N]
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    tiles_per_chain = chain_k // BLOCK_K
    if SPLIT:
        off_m, off_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        chain = tl.program_id(1)
        acc = _chain(x, w, off_m, off_n, chain * chain_k, tiles_per_chain, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
                     EVEN_K, USE_TMA, X_T, W_T, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        _store_tile(out_ptr + chain.to(tl.int64) * stride_oc, acc, off_m, off_n, M, N, stride_om,
                    bias_ptr, False, BLOCK_M, BLOCK_N)
    else:  # one tile per program, all its chains, folded as the tree says
        tile = tl.program_id(0)
        off_m, off_n = _tile_ids(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        if NUM_CHAINS == 1:
            acc = _chain(x, w, off_m, off_n, 0, tl.cdiv(K, BLOCK_K), M, N, K, stride_xm, stride_xk, stride_wn,
                         stride_wk, EVEN_K, USE_TMA, X_T, W_T, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        else:
            acc = _chain(x, w, off_m, off_n, 0, tiles_per_chain, M, N, K, stride_xm, stride_xk, stride_wn,
                         stride_wk, EVEN_K, USE_TMA, X_T, W_T, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
            acc += _chain(x, w, off_m, off_n, chain_k, tiles_per_chain, M, N, K, stride_xm, stride_xk, stride_wn,
                          stride_wk, EVEN_K, USE_TMA, X_T, W_T, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
            if NUM_CHAINS == 4:
                # c0+c1 waits in this tile's scratch: a third live 128x128 fp32 tile spills in the k loop.
                _park(scratch_ptr, tile, acc, False, BLOCK_M, BLOCK_N)
                hi = _chain(x, w, off_m, off_n, 2 * chain_k, tiles_per_chain, M, N, K, stride_xm, stride_xk,
                            stride_wn, stride_wk, EVEN_K, USE_TMA, X_T, W_T, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
                hi += _chain(x, w, off_m, off_n, 3 * chain_k, tiles_per_chain, M, N, K, stride_xm, stride_xk,
                             stride_wn, stride_wk, EVEN_K, USE_TMA, X_T, W_T, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
                tl.debug_barrier()  # parked by other threads
                acc = _park(scratch_ptr, tile, hi, True, BLOCK_M, BLOCK_N) + hi
        _store_tile(out_ptr, acc, off_m, off_n, M, N, stride_om, bias_ptr, HAS_BIAS, BLOCK_M, BLOCK_N)


@triton.jit
def _park(scratch_ptr, tile, acc, LOAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          INTERPRET: tl.constexpr = _INTERPRET):
    """Store acc to (or load a tile like it from) this tile's [BLOCK_M, BLOCK_N] fp32 scratch."""
    # The opaque move keeps the compiler from computing the addresses once for both calls and
    # holding them (128 registers) across the two chains in between.
    if not INTERPRET:
        tile = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [tile], dtype=tl.int32, is_pure=False, pack=1)
    base = scratch_ptr + tile.to(tl.int64) * (BLOCK_M * BLOCK_N)
    ptrs = base + tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    if LOAD:
        return tl.load(ptrs)
    tl.store(ptrs, acc)
    return acc


@triton.jit
def _combine_kernel(part_ptr, bias_ptr, out_ptr, M, N, stride_pc,
                    NUM_CHAINS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    # part [NUM_CHAINS, M, N] fp32 contiguous -> out [M, N], the tree of _linear_kernel (+ bias).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.load(part_ptr + offs, mask=mask, other=0.0) + tl.load(part_ptr + stride_pc + offs, mask=mask, other=0.0)
    if NUM_CHAINS == 4:
        hi = tl.load(part_ptr + 2 * stride_pc + offs, mask=mask, other=0.0)
        acc = acc + (hi + tl.load(part_ptr + 3 * stride_pc + offs, mask=mask, other=0.0))
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _check(x2d: torch.Tensor, w: torch.Tensor) -> None:
    if x2d.dim() != 2 or w.dim() != 2 or x2d.shape[1] != w.shape[1]:
        raise ValueError(f"linear: x2d [M, K] and w [N, K] must share K; got {tuple(x2d.shape)} and {tuple(w.shape)}")
    if x2d.dtype != w.dtype or x2d.dtype not in _CONFIGS:
        raise ValueError(f"linear: x2d and w must both be fp32, bf16 or fp16; got {x2d.dtype} and {w.dtype}")
    if not (x2d.is_cuda and w.is_cuda and x2d.device == w.device):
        raise ValueError("linear: the Triton kernel needs x2d and w on the same CUDA device")


def _tma_view(t: torch.Tensor, block_rows: int, block_k: int):
    """A TMA descriptor for a 2-D operand [R, K]: (desc, transposed) or None if TMA can't read it."""
    if TensorDescriptor is None or t.data_ptr() % 16:
        return None
    size = t.element_size()
    if t.stride(1) == 1 and (t.stride(0) * size) % 16 == 0:
        return TensorDescriptor(t, list(t.shape), [t.stride(0), 1], [block_rows, block_k]), False
    if t.stride(0) == 1 and (t.stride(1) * size) % 16 == 0:  # a transposed view, e.g. w.t()
        return TensorDescriptor(t.t(), [t.shape[1], t.shape[0]], [t.stride(1), 1], [block_k, block_rows]), True
    return None


def _launch(x2d, w, bias, out_dtype, split=None, use_tma=None, num_stages=None):
    """The private knobs (None = automatic) exist for tests and benchmarks; none changes the bits."""
    _check(x2d, w)
    M, K = x2d.shape
    N = w.shape[0]
    out = torch.empty((M, N), device=x2d.device, dtype=out_dtype)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.copy_(bias.float().expand(M, N) if bias is not None else torch.zeros_like(out))
    block_m, block_n, block_k, num_warps = _CONFIGS[x2d.dtype]
    chains = num_chains(K)
    num_tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    if split is None:  # only the grid depends on M; the bits do not
        split = num_tiles <= _num_sms(x2d.device.index or 0) // 2
    split = split and chains > 1
    meta = dict(NUM_CHAINS=chains, EVEN_K=K % block_k == 0,
                PRECISION="ieee" if x2d.dtype == torch.float32 else "tf32",
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
                num_warps=num_warps, num_stages=num_stages or (5 if split else 4))
    bias_arg = bias if bias is not None else out
    if split:
        part = torch.empty((chains, M, N), device=x2d.device, dtype=torch.float32)
        xa, wa, tma = _operands(x2d, w, use_tma, block_m, block_n, block_k)
        _linear_kernel[(num_tiles, chains)](
            xa, wa, bias_arg, part, part, M, N, K, K // chains, x2d.stride(0), x2d.stride(1), w.stride(0),
            w.stride(1), part.stride(0), part.stride(1), SPLIT=True, HAS_BIAS=False, **tma, **meta)
        block = 1024
        _combine_kernel[(triton.cdiv(M * N, block),)](
            part, bias_arg, out, M, N, part.stride(0), NUM_CHAINS=chains, HAS_BIAS=bias is not None, BLOCK=block,
            num_warps=4)
        return out
    # With 4 chains every tile parks an fp32 tile in scratch: bound it by launching row slabs.
    rows = M if chains < 4 else max(block_m, _MAX_PARK_BYTES // (4 * N) // block_m * block_m)
    scratch = out
    if chains == 4:
        scratch = torch.empty((triton.cdiv(min(rows, M), block_m) * triton.cdiv(N, block_n), block_m * block_n),
                              device=x2d.device, dtype=torch.float32)
    for m0 in range(0, M, rows):
        xs, outs = x2d[m0 : m0 + rows], out[m0 : m0 + rows]
        ms = xs.shape[0]
        xa, wa, tma = _operands(xs, w, use_tma, block_m, block_n, block_k)
        _linear_kernel[(triton.cdiv(ms, block_m) * triton.cdiv(N, block_n), 1)](
            xa, wa, bias_arg, outs, scratch, ms, N, K, K // chains, xs.stride(0), xs.stride(1), w.stride(0),
            w.stride(1), 0, outs.stride(0), SPLIT=False, HAS_BIAS=bias is not None, **tma, **meta)
    return out


@functools.cache
def _libcuda():
    return ctypes.CDLL("libcuda.so.1")


def _ensure_context(device_index: int) -> None:
    """Make the device's primary context current in this thread if none is.

    The driver encodes TMA descriptors in the calling thread, which needs a current context;
    autograd's device threads may not have one yet (torch only sets it lazily, for cuBLAS).
    """
    lib, ctx = _libcuda(), ctypes.c_void_p()
    if lib.cuCtxGetCurrent(ctypes.byref(ctx)) == 0 and not ctx.value:
        dev = ctypes.c_int()
        if lib.cuDeviceGet(ctypes.byref(dev), device_index) != 0 or \
                lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) != 0 or lib.cuCtxSetCurrent(ctx) != 0:
            raise RuntimeError(f"linear: could not make CUDA device {device_index}'s context current in this thread")


def _operands(x2d, w, use_tma, block_m, block_n, block_k):
    """-> (x arg, w arg, TMA flags): descriptors when both operands allow TMA, else the tensors."""
    x_tma = _tma_view(x2d, block_m, block_k) if use_tma is not False else None
    w_tma = _tma_view(w, block_n, block_k) if use_tma is not False else None
    if x_tma is None or w_tma is None:
        if use_tma:
            raise ValueError("linear: use_tma=True but an operand is not 16-byte aligned / K-major")
        return x2d, w, dict(USE_TMA=False, X_T=False, W_T=False)
    _ensure_context(x2d.device.index or 0)
    return x_tma[0], w_tma[0], dict(USE_TMA=True, X_T=x_tma[1], W_T=w_tma[1])


def linear_partial(x2d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x2d [M, K], w [N, K] -> fp32 [M, N]: the chain tree over K, no bias, no downcast."""
    return _launch(x2d, w, None, torch.float32)


def linear_fwd(x2d: torch.Tensor, w: torch.Tensor, bias, out_dtype: torch.dtype) -> torch.Tensor:
    """(linear_partial(x2d, w) + bias.float()).to(out_dtype); bias [N] or None."""
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != w.shape[0]):
        raise ValueError(f"linear: bias must be [N={w.shape[0]}], got {tuple(bias.shape)}")
    return _launch(x2d, w, bias, out_dtype)
