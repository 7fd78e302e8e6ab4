"""Batch-invariant linear on NVIDIA GPUs: out[M, N] = x[M, K] @ w[N, K]^T, fp32 accumulation.

The arithmetic of one output element is fixed by K and the dtype alone (never by M, the grid,
the strides, or a run):
  * K is cut into `num_chains(K)` equal chains (1 or 2). Inside a chain, BLOCK_K-wide slices are
    accumulated in increasing k by `tl.dot` into an fp32 accumulator that starts at zero.
  * Two chain partials are added once: c0 + c1 (the top node of README.md's balanced tree).
So a half-K shard (tensor parallel 2) computes exactly one chain, and adding the two shard
results gives the unsplit result bit for bit. The GPU does not walk the TILE_K=32 tree of the
CPU reference further down: every pending node of that tree is a 128x128 fp32 tile held in
registers, and a third one already spills inside the k loop (checked with ptxas for sm_90).

What M changes is only who computes what: with few output tiles (decode) each chain runs in its
own program and writes an fp32 partial, and a second kernel adds the two; with many tiles one
program walks both chains and adds them in registers. Loads go through TMA when the operands'
layout allows it (K-major or transposed views, 16-byte aligned), else through pointers. None of
these choices changes a bit of the result (tests/kernels/test_triton_linear.py checks it).
"""

import functools

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
# A chain is a multiple of this many columns; K must be a multiple of 2 * CHAIN_UNIT for 2 chains.
CHAIN_UNIT = 1024
MAX_CHAINS = 2


def num_chains(k: int) -> int:
    """Chains K is cut into: 2 when K is a multiple of 2 * CHAIN_UNIT, else 1."""
    return MAX_CHAINS if k % (MAX_CHAINS * CHAIN_UNIT) == 0 else 1


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped raster over output tiles so neighbouring programs share operand tiles in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _chain(x, w, x_ptrs, w_ptrs, off_m, off_n, k_start, num_k_tiles, K, mask_m, mask_n,
           stride_xk, stride_wk, EVEN_K: tl.constexpr, USE_TMA: tl.constexpr, X_T: tl.constexpr,
           W_T: tl.constexpr, PRECISION: tl.constexpr,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # One chain: fp32 sum over BLOCK_K slices in increasing k, starting from zero.
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(num_k_tiles):
        k = k_start + t * BLOCK_K
        if USE_TMA:  # out-of-bounds rows/columns of a box read as zeros
            if X_T:
                a = x.load([k, off_m]).T
            else:
                a = x.load([off_m, k])
            if W_T:
                b = w.load([k, off_n])
            else:
                b = w.load([off_n, k]).T
        else:
            if EVEN_K:
                a = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
                b = tl.load(w_ptrs, mask=mask_n[None, :], other=0.0)
            else:
                k_left = K - k
                a = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
                b = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _linear_kernel(
    x, w, bias_ptr, out_ptr,
    M, N, K, chain_k,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_oc, stride_om, stride_on,
    NUM_CHAINS: tl.constexpr,  # chains K is cut into (1 or 2)
    SPLIT: tl.constexpr,  # one program per chain (program_id(1)); writes an fp32 partial
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no K mask (pointer loads only)
    USE_TMA: tl.constexpr,  # x, w are tensor descriptors (else plain pointers with strides)
    X_T: tl.constexpr,  # TMA only: x's descriptor is over x.t() [K, M]
    W_T: tl.constexpr,  # TMA only: w's descriptor is over w.t() [K, N]
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if SPLIT:
        chain = tl.program_id(1)
        k_start = chain * chain_k
        num_k_tiles = chain_k // BLOCK_K
    else:
        chain = 0
        k_start = 0
        num_k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_chain = chain_k // BLOCK_K
    x_ptrs = 0  # unused with TMA
    w_ptrs = 0
    if not USE_TMA:
        x_ptrs = x + offs_m[:, None].to(tl.int64) * stride_xm + (k_start + offs_k).to(tl.int64)[None, :] * stride_xk
        w_ptrs = w + offs_n[None, :].to(tl.int64) * stride_wn + (k_start + offs_k).to(tl.int64)[:, None] * stride_wk

    if SPLIT or NUM_CHAINS == 1:
        acc = _chain(x, w, x_ptrs, w_ptrs, off_m, off_n, k_start, num_k_tiles, K, mask_m, mask_n,
                     stride_xk, stride_wk, EVEN_K, USE_TMA, X_T, W_T, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    else:  # both chains here, added as the tree says
        acc = _chain(x, w, x_ptrs, w_ptrs, off_m, off_n, 0, tiles_per_chain, K, mask_m, mask_n,
                     stride_xk, stride_wk, EVEN_K, USE_TMA, X_T, W_T, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        half = chain_k.to(tl.int64)
        acc += _chain(x, w, x_ptrs + half * stride_xk, w_ptrs + half * stride_wk, off_m, off_n,
                      chain_k, tiles_per_chain, K, mask_m, mask_n,
                      stride_xk, stride_wk, EVEN_K, USE_TMA, X_T, W_T, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)

    if SPLIT:
        out_ptr += chain.to(tl.int64) * stride_oc
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT:
        tl.store(out_ptrs, acc, mask=mask)  # fp32 chain partial
    else:
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_kernel(part_ptr, bias_ptr, out_ptr, M, N, stride_pc, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    # part [2, M, N] fp32 contiguous -> out [M, N] = c0 + c1 (+ bias), as _linear_kernel adds them.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.load(part_ptr + offs, mask=mask, other=0.0) + tl.load(part_ptr + stride_pc + offs, mask=mask, other=0.0)
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


def _launch(x2d, w, bias, out_dtype, split=None, use_tma=None):
    """The private knobs `split` / `use_tma` (None = automatic) exist for tests and benchmarks."""
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
    x_tma = _tma_view(x2d, block_m, block_k) if use_tma is not False else None
    w_tma = _tma_view(w, block_n, block_k) if use_tma is not False else None
    tma = x_tma is not None and w_tma is not None
    if use_tma and not tma:
        raise ValueError("linear: use_tma=True but an operand is not 16-byte aligned / K-major")
    bias_arg = bias if bias is not None else out
    common = dict(
        NUM_CHAINS=chains, EVEN_K=K % block_k == 0, USE_TMA=tma,
        X_T=tma and x_tma[1], W_T=tma and w_tma[1],
        PRECISION="ieee" if x2d.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
        num_warps=num_warps, num_stages=5 if split else 3)
    xa = x_tma[0] if tma else x2d
    wa = w_tma[0] if tma else w
    strides = (x2d.stride(0), x2d.stride(1), w.stride(0), w.stride(1))
    if not split:
        _linear_kernel[(num_tiles, 1)](
            xa, wa, bias_arg, out, M, N, K, K // chains, *strides, 0, out.stride(0), out.stride(1),
            SPLIT=False, HAS_BIAS=bias is not None, **common)
        return out
    part = torch.empty((chains, M, N), device=x2d.device, dtype=torch.float32)
    _linear_kernel[(num_tiles, chains)](
        xa, wa, bias_arg, part, M, N, K, K // chains, *strides, part.stride(0), part.stride(1), part.stride(2),
        SPLIT=True, HAS_BIAS=False, **common)
    block = 1024
    _combine_kernel[(triton.cdiv(M * N, block),)](
        part, bias_arg, out, M, N, part.stride(0), HAS_BIAS=bias is not None, BLOCK=block, num_warps=4)
    return out


def linear_partial(x2d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x2d [M, K], w [N, K] -> fp32 [M, N]: the chain tree over K, no bias, no downcast."""
    return _launch(x2d, w, None, torch.float32)


def linear_fwd(x2d: torch.Tensor, w: torch.Tensor, bias, out_dtype: torch.dtype) -> torch.Tensor:
    """(linear_partial(x2d, w) + bias.float()).to(out_dtype); bias [N] or None."""
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != w.shape[0]):
        raise ValueError(f"linear: bias must be [N={w.shape[0]}], got {tuple(bias.shape)}")
    return _launch(x2d, w, bias, out_dtype)
