"""Batch-invariant linear on NVIDIA GPUs: out[M, N] = x[M, K] @ w[N, K]^T, fp32 accumulation.

The arithmetic of one output element is fixed by K and the dtype alone (never by M, the grid,
the strides, or a run):
  * K is cut into chains of CHAIN_K columns (the last one zero padded). Inside a chain,
    BLOCK_K-wide slices are accumulated in increasing k by `tl.dot` into an fp32 accumulator
    that starts at zero.
  * The chain partials are added left to right: total = ((0 + c0) + c1) + c2 ...

What M changes is only who computes what. Few output tiles (decode): one program per (tile,
chain) writes its fp32 partial, and the partials are added in chain order: by the last program
of a tile to finish when M is a few rows (a counter per tile says which is last; nothing is
added in arrival order), else by a second kernel spread over the output. Many
tiles (prefill, training): one program per tile walks K once, adding each chain's accumulator to
the total at the chain's end. Tiles may be 64 or 128 rows: both run the same m64n128k16 MMA per
warpgroup over the same k order. Loads go through TMA when the operands allow it, else through
pointers. None of these choices changes a bit (tests/kernels/test_triton_linear.py).

`linear_group_fwd` runs weights that share x (q/k/v, gate/up) as one [sum N_i, K] operand when
they are consecutive rows of one buffer: one launch, each column's arithmetic that of its own
weight's `linear`.

Tensor parallel does not split K (row-parallel layers gather their input instead), so the
chain length is free to serve decode: CHAIN_K = 512 gives K / 512 programs per output tile.
"""

import ctypes
import functools
import os
import threading

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors (triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: pointer loads only
    TensorDescriptor = None

# One arithmetic per dtype: (BLOCK_K, dot precision); CHAIN_K is a multiple of every BLOCK_K.
CHAIN_K = 512
_ARITH = {
    torch.bfloat16: (64, "tf32"),
    torch.float16: (64, "tf32"),
    torch.float32: (32, "ieee"),  # exact fp32 products (FMA), used by tests and fp32 models
}
# Tile shapes per dtype, (BLOCK_M, BLOCK_N, num_warps): "big" for many tiles, "small" for decode.
# bf16/fp16: 64 rows on one warpgroup or 128 on two issue the same MMA per warpgroup.
_TILES = {
    torch.bfloat16: {"big": (128, 128, 8), "small": (64, 128, 4)},
    torch.float16: {"big": (128, 128, 8), "small": (64, 128, 4)},
    torch.float32: {"big": (64, 64, 8), "small": (64, 64, 8)},
}
_SMALL_M = 64  # M at or below this takes the "small" tiles (speed only)
_FOLD_IN_KERNEL_MAX_M = 16  # split: up to this M the tile's last program folds, else a second kernel
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_MAX_COUNTERS = 1 << 16  # output tiles of one split launch (a counter each)


def num_chains(k: int) -> int:
    return max(1, triton.cdiv(k, CHAIN_K))


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def _counters(device: torch.device) -> torch.Tensor:
    """Per-device tile counters of the split path; every launch leaves them at zero again.

    Allocated on first use, which is eager (vLLM warms up before it captures a graph); kernels
    of one stream run one after another, so they can share it."""
    return torch.zeros(_MAX_COUNTERS, dtype=torch.int32, device=device)


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
def _load_slice(x, w, k, off_m, off_n, offs_m, offs_n, offs_k, M, N_w, K, stride_xm, stride_xk, stride_wn, stride_wk,
                EVEN_K: tl.constexpr, USE_TMA: tl.constexpr, X_T: tl.constexpr, W_T: tl.constexpr):
    """x[off_m:+BM, k:+BK] and w[off_n:+BN, k:+BK]^T; out-of-range rows/columns read as zeros."""
    if USE_TMA:
        if X_T:
            a = x.load([k, off_m]).T
        else:
            a = x.load([off_m, k])
        if W_T:
            b = w.load([k, off_n])
        else:
            b = w.load([off_n, k]).T
    else:
        ks = k + offs_k
        x_ptrs = x + offs_m[:, None].to(tl.int64) * stride_xm + ks[None, :].to(tl.int64) * stride_xk
        w_ptrs = w + offs_n[None, :].to(tl.int64) * stride_wn + ks[:, None].to(tl.int64) * stride_wk
        if EVEN_K:
            a = tl.load(x_ptrs, mask=(offs_m < M)[:, None], other=0.0)
            b = tl.load(w_ptrs, mask=(offs_n < N_w)[None, :], other=0.0)
        else:
            a = tl.load(x_ptrs, mask=(offs_m < M)[:, None] & (ks < K)[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=(ks < K)[:, None] & (offs_n < N_w)[None, :], other=0.0)
    return a, b


@triton.jit
def _chain(x, w, off_m, off_n, k_start, num_slices, M, N_w, K, stride_xm, stride_xk, stride_wn, stride_wk,
           EVEN_K: tl.constexpr, USE_TMA: tl.constexpr, X_T: tl.constexpr, W_T: tl.constexpr,
           PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One chain: the fp32 sum of `num_slices` BLOCK_K slices from k_start, from a zero accumulator."""
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(num_slices):
        a, b = _load_slice(x, w, k_start + t * BLOCK_K, off_m, off_n, offs_m, offs_n, offs_k, M, N_w, K,
                           stride_xm, stride_xk, stride_wn, stride_wk, EVEN_K, USE_TMA, X_T, W_T)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _all_chains(x, w, off_m, off_n, M, N_w, K, stride_xm, stride_xk, stride_wn, stride_wk,
                EVEN_K: tl.constexpr, USE_TMA: tl.constexpr, X_T: tl.constexpr, W_T: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                SLICES: tl.constexpr):
    """The whole K in one flat loop (so loads stay pipelined across chains): each chain's
    accumulator joins the total at the chain's last slice, then restarts from zero."""
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_slices = tl.cdiv(K, BLOCK_K)
    for t in range(num_slices):
        a, b = _load_slice(x, w, t * BLOCK_K, off_m, off_n, offs_m, offs_n, offs_k, M, N_w, K,
                           stride_xm, stride_xk, stride_wn, stride_wk, EVEN_K, USE_TMA, X_T, W_T)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if (t % SLICES == SLICES - 1) | (t == num_slices - 1):
            total = total + acc
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    return total


@triton.jit
def _store_tile(out_ptr, acc, off_m, off_n, M, N, stride_om, bias_ptr, HAS_BIAS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # out is row-major with unit column stride; in-tile offsets stay 32-bit (fewer registers).
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    if HAS_BIAS:  # added once, after the chains, in fp32
        acc = acc + tl.load(bias_ptr + off_n + cols, mask=cols < N - off_n, other=0.0).to(tl.float32)[None, :]
    base = out_ptr + off_m.to(tl.int64) * stride_om + off_n
    mask = (rows[:, None] < M - off_m) & (cols[None, :] < N - off_n)
    tl.store(base + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fold_tile(part_ptr, off_m, off_n, M, N, stride_pc, num_chains, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """((0 + p[0]) + p[1]) + ... of one tile of part [chains, M, N] (fp32, contiguous), read from L2."""
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M - off_m) & (cols[None, :] < N - off_n)
    ptrs = part_ptr + off_m.to(tl.int64) * N + off_n + rows[:, None] * N + cols[None, :]
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c in range(num_chains):
        total = total + tl.load(ptrs + c * stride_pc, mask=mask, other=0.0, cache_modifier=".cg")
    return total


@triton.jit
def _linear_kernel(
    x, w, bias_ptr, out_ptr, part_ptr, count_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_pc,
    SPLIT: tl.constexpr,  # one program per (tile, chain = program_id(1)) + the ordered fold
    FOLD_IN_KERNEL: tl.constexpr,  # SPLIT: the tile's last program folds (else _fold_kernel does)
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no K mask (pointer loads only)
    USE_TMA: tl.constexpr,  # x, w are tensor descriptors (else plain pointers with strides)
    X_T: tl.constexpr,  # TMA only: x's descriptor is over x.t() [K, M]
    W_T: tl.constexpr,  # TMA only: w's descriptor is over w.t() [K, N]
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SLICES: tl.constexpr,  # CHAIN_K // BLOCK_K
):
    tile = tl.program_id(0)
    off_m, off_n = _tile_ids(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    if SPLIT:
        chain = tl.program_id(1)
        num_chains = tl.num_programs(1)
        k_start = chain * (SLICES * BLOCK_K)
        num_slices = tl.minimum(SLICES, tl.cdiv(K - k_start, BLOCK_K))
        acc = _chain(x, w, off_m, off_n, k_start, num_slices, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
                     EVEN_K, USE_TMA, X_T, W_T, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        _store_tile(part_ptr + chain.to(tl.int64) * stride_pc, acc, off_m, off_n, M, N, N, bias_ptr, False,
                    BLOCK_M, BLOCK_N)
        if FOLD_IN_KERNEL:
            # Publish this partial, then count it; whoever counts last folds all of them in chain
            # order and re-arms the counter for the next launch (or graph replay).
            tl.debug_barrier()
            arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if arrived == num_chains - 1:
                total = _fold_tile(part_ptr, off_m, off_n, M, N, stride_pc, num_chains, BLOCK_M, BLOCK_N)
                _store_tile(out_ptr, total, off_m, off_n, M, N, stride_om, bias_ptr, HAS_BIAS, BLOCK_M, BLOCK_N)
                tl.atomic_xchg(count_ptr + tile, 0, sem="relaxed", scope="gpu")
    else:
        total = _all_chains(x, w, off_m, off_n, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
                            EVEN_K, USE_TMA, X_T, W_T, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, SLICES)
        _store_tile(out_ptr, total, off_m, off_n, M, N, stride_om, bias_ptr, HAS_BIAS, BLOCK_M, BLOCK_N)


@triton.jit
def _fold_kernel(part_ptr, bias_ptr, out_ptr, M, N, stride_pc, stride_om, num_chains, HAS_BIAS: tl.constexpr,
                 BLOCK: tl.constexpr):
    # The same ordered fold as the in-kernel one, as a second launch spread over BLOCK-element
    # slices of out (FOLD_IN_KERNEL=False): at M beyond a few rows one program per tile would
    # read all of a tile's partials alone.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(num_chains):
        total = total + tl.load(part_ptr + c * stride_pc + offs, mask=mask, other=0.0)
    col = offs % N
    if HAS_BIAS:
        total = total + tl.load(bias_ptr + col, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + (offs // N) * stride_om + col, total.to(out_ptr.dtype.element_ty), mask=mask)


def _check(x2d: torch.Tensor, w: torch.Tensor) -> None:
    if x2d.dim() != 2 or w.dim() != 2 or x2d.shape[1] != w.shape[1]:
        raise ValueError(f"linear: x2d [M, K] and w [N, K] must share K; got {tuple(x2d.shape)} and {tuple(w.shape)}")
    if x2d.dtype != w.dtype or x2d.dtype not in _ARITH:
        raise ValueError(f"linear: x2d and w must both be fp32, bf16 or fp16; got {x2d.dtype} and {w.dtype}")
    if not (x2d.is_cuda and w.is_cuda and x2d.device == w.device):
        raise ValueError("linear: the Triton kernel needs x2d and w on the same CUDA device")


def _tma_view(t: torch.Tensor, block_rows: int, block_k: int):
    """A TMA descriptor for a 2-D operand [R, K]: (desc, transposed) or None if TMA can't read it."""
    if TensorDescriptor is None or _INTERPRET or t.data_ptr() % 16:
        return None
    size = t.element_size()
    if t.stride(1) == 1 and (t.stride(0) * size) % 16 == 0:
        return TensorDescriptor(t, list(t.shape), [t.stride(0), 1], [block_rows, block_k]), False
    if t.stride(0) == 1 and (t.stride(1) * size) % 16 == 0:  # a transposed view, e.g. w.t()
        return TensorDescriptor(t.t(), [t.shape[1], t.shape[0]], [t.stride(1), 1], [block_k, block_rows]), True
    return None


@functools.cache
def _libcuda():
    return ctypes.CDLL("libcuda.so.1")


_threads = threading.local()  # .ready: devices whose context this thread has checked


def _ensure_context(device_index: int) -> None:
    """Make the device's primary context current in this thread if none is (once per thread).

    The driver encodes TMA descriptors in the calling thread, which needs a current context;
    autograd's device threads may not have one yet (torch only sets it lazily, for cuBLAS).
    """
    ready = _threads.__dict__.setdefault("ready", set())
    if device_index in ready:
        return
    lib, ctx = _libcuda(), ctypes.c_void_p()
    if lib.cuCtxGetCurrent(ctypes.byref(ctx)) == 0 and not ctx.value:
        dev = ctypes.c_int()
        if lib.cuDeviceGet(ctypes.byref(dev), device_index) != 0 or \
                lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) != 0 or lib.cuCtxSetCurrent(ctx) != 0:
            raise RuntimeError(f"linear: could not make CUDA device {device_index}'s context current in this thread")
    ready.add(device_index)


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


def _launch(x2d, w, bias, out_dtype, out=None, split=None, use_tma=None, tiles=None, fold_in_kernel=None,
            num_stages=4):
    """out [M, N] (a new tensor, or `out`: any [M, N] view with unit column stride).

    The private knobs (None = automatic) exist for tests and benchmarks; none changes the bits.
    """
    _check(x2d, w)
    M, K = x2d.shape
    N = w.shape[0]
    if out is None:
        out = torch.empty((M, N), device=x2d.device, dtype=out_dtype)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.copy_(bias.float().expand(M, N) if bias is not None else torch.zeros((M, N), device=out.device))
    block_k, precision = _ARITH[x2d.dtype]
    block_m, block_n, num_warps = _TILES[x2d.dtype][tiles or ("small" if M <= _SMALL_M else "big")]
    chains = num_chains(K)
    num_tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    if split is None:  # only the grid depends on M; the bits do not
        split = num_tiles <= _num_sms(x2d.device.index or 0) // 2
    split = split and chains > 1
    if fold_in_kernel is None:
        fold_in_kernel = M <= _FOLD_IN_KERNEL_MAX_M
    fold_in_kernel = fold_in_kernel and num_tiles <= _MAX_COUNTERS
    xa, wa, flags = _operands(x2d, w, use_tma, block_m, block_n, block_k)
    bias_arg = bias if bias is not None else out
    meta = dict(HAS_BIAS=bias is not None, EVEN_K=K % block_k == 0, PRECISION=precision, BLOCK_M=block_m,
                BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, SLICES=CHAIN_K // block_k, num_warps=num_warps,
                num_stages=num_stages, **flags)
    strides = (x2d.stride(0), x2d.stride(1), w.stride(0), w.stride(1), out.stride(0))
    if split:
        part = torch.empty((chains, M, N), device=x2d.device, dtype=torch.float32)
        counters = _counters(x2d.device) if fold_in_kernel else part
        _linear_kernel[(num_tiles, chains)](xa, wa, bias_arg, out, part, counters, M, N, K, *strides, part.stride(0),
                                            SPLIT=True, FOLD_IN_KERNEL=fold_in_kernel, **meta)
        if not fold_in_kernel:
            block = 1024
            _fold_kernel[(triton.cdiv(M * N, block),)](part, bias_arg, out, M, N, part.stride(0), out.stride(0),
                                                       chains, HAS_BIAS=bias is not None, BLOCK=block, num_warps=4)
        return out
    _linear_kernel[(num_tiles, 1)](xa, wa, bias_arg, out, out, out, M, N, K, *strides, 0,
                                   SPLIT=False, FOLD_IN_KERNEL=False, **meta)
    return out


def _adjacent(weights) -> torch.Tensor | None:
    """The [sum N_i, K] view the weights form when they are consecutive rows of one buffer, else None."""
    first = weights[0]
    if any(w.dtype != first.dtype or w.device != first.device or w.shape[1] != first.shape[1] or not w.is_contiguous()
           for w in weights):
        return None
    row_bytes = first.shape[1] * first.element_size()
    expected = first.data_ptr()
    for w in weights:
        if w.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or w.data_ptr() != expected:
            return None
        expected += w.shape[0] * row_bytes
    return first.as_strided((sum(w.shape[0] for w in weights), first.shape[1]), first.stride())


def linear_partial(x2d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x2d [M, K], w [N, K] -> fp32 [M, N]: the chain sums over K, no bias, no downcast."""
    return _launch(x2d, w, None, torch.float32)


def linear_fwd(x2d: torch.Tensor, w: torch.Tensor, bias, out_dtype: torch.dtype) -> torch.Tensor:
    """(linear_partial(x2d, w) + bias.float()).to(out_dtype); bias [N] or None."""
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != w.shape[0]):
        raise ValueError(f"linear: bias must be [N={w.shape[0]}], got {tuple(bias.shape)}")
    return _launch(x2d, w, bias, out_dtype)


def linear_group_fwd(x2d: torch.Tensor, weights, out_dtype: torch.dtype) -> torch.Tensor:
    """[M, sum N_i] = cat([linear_fwd(x2d, w, None, out_dtype) for w in weights], 1).

    One launch when the weights are consecutive rows of one buffer (see models/qwen3's
    `pack_projections`), else one launch per weight into its columns; the same bits either way."""
    fused = _adjacent(weights)
    if fused is not None:
        return _launch(x2d, fused, None, out_dtype)
    out = torch.empty((x2d.shape[0], sum(w.shape[0] for w in weights)), device=x2d.device, dtype=out_dtype)
    col = 0
    for w in weights:
        _launch(x2d, w, None, out_dtype, out=out[:, col:col + w.shape[0]])
        col += w.shape[0]
    return out
