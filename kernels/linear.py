"""Batch-invariant linear: y = x @ W^T (+ b), fp32 accumulation.

CPU (the reference): K is cut into tiles of TILE_K; a tile's fp32 products are summed by
halving, and the tile partials are folded in the balanced tree of `_tree.tree_fold`. No BLAS:
its order depends on M. On this tree, K-shards combine exactly: `tree_combine` of the S
`linear_partial`s of equal, TILE_K-aligned shards (S a power of two) equals the unsplit result.
CUDA runs its own fixed order (chains of `triton.linear.CHAIN_K`), see kernels/triton/README.md.

`linear_group(x, [w0, w1, ...])` is `cat([linear(x, w) for w in ws], -1)` bit for bit, in one
launch on CUDA (q/k/v and gate/up share their input).
"""

from itertools import accumulate
from typing import Optional

import torch
from torch import Tensor

from lockstep.kernels._dispatch import op, triton_fn
from lockstep.kernels._tree import halving_sum, tree_fold

TILE_K = 32
_MAX_CHUNK_NUMEL = 1 << 20  # fp32 products per row chunk (4 MiB, measured fastest)


def _acc_dtype(x: Tensor, w: Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (x.dtype, w.dtype) else torch.float32


def linear_partial_reference(x2d: Tensor, w: Tensor) -> Tensor:
    """x2d [M, K], w [N, K] -> fp32 [M, N] (fp64 for fp64 inputs): the K-tile tree, no bias."""
    num_rows, k = x2d.shape
    n = w.shape[0]
    acc_dtype = _acc_dtype(x2d, w)
    num_tiles = max(1, -(-k // TILE_K))
    k_pad = num_tiles * TILE_K
    xt = x2d.t().to(acc_dtype)  # [K, M]
    wt = w.t().to(acc_dtype)  # [K, N]
    if k_pad != k:
        xt = torch.cat([xt, xt.new_zeros(k_pad - k, num_rows)])
        wt = torch.cat([wt, wt.new_zeros(k_pad - k, n)])
    wt = wt.reshape(num_tiles, TILE_K, 1, n)
    out = torch.empty(num_rows, n, dtype=acc_dtype, device=x2d.device)
    # Row chunks only bound memory (sized to stay in cache): every row's arithmetic is the
    # same whatever the chunk.
    rows_per_chunk = max(1, _MAX_CHUNK_NUMEL // (k_pad * max(n, 1)))
    for r0 in range(0, num_rows, rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, num_rows)
        xs = xt[:, r0:r1].reshape(num_tiles, TILE_K, r1 - r0, 1)
        out[r0:r1] = tree_fold(halving_sum(xs * wt))  # products [tiles, TILE_K, rows, N]
    return out


def linear_reference(x2d: Tensor, w: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """x2d [M, K], w [N, K], bias [N] -> [M, N] in x2d's dtype; bias added once, in fp32."""
    acc = linear_partial_reference(x2d, w)
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(x2d.dtype)


def tree_combine(partials: list[Tensor]) -> Tensor:
    """Fold the fp32 partials of S K-shards (in shard order, S a power of two)."""
    num_shards = len(partials)
    if num_shards == 0 or num_shards & (num_shards - 1):
        raise ValueError(f"tree_combine needs a power-of-two number of K-shards, got {num_shards}")
    if any(not p.is_floating_point() or p.dtype.itemsize < 4 for p in partials):
        raise ValueError("tree_combine takes the fp32 outputs of linear_partial; do not downcast them first")
    return tree_fold(list(partials))


def _check(x: Tensor, w: Tensor) -> None:
    if w.dim() != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"linear: x [..., K] and weight [N, K] disagree: {tuple(x.shape)} vs {tuple(w.shape)}")


def _triton(name: str, x2d: Tensor, w: Tensor):
    """The Triton function for CUDA operands, else None; fp64 (no Triton kernel) takes the reference."""
    return triton_fn("linear", name) if x2d.is_cuda and _acc_dtype(x2d, w) == torch.float32 else None


def _partial_2d(x2d: Tensor, w: Tensor) -> Tensor:
    fn = _triton("linear_partial", x2d, w)
    return fn(x2d, w) if fn is not None else linear_partial_reference(x2d, w)


@op("linear_partial", mutates_args=())
def _linear_partial_op(x: Tensor, weight: Tensor) -> Tensor:
    _check(x, weight)
    return _partial_2d(x.reshape(-1, x.shape[-1]), weight).reshape(*x.shape[:-1], weight.shape[0])


@op("linear", mutates_args=())
def _linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    _check(x, weight)
    x2d = x.reshape(-1, x.shape[-1])
    fn = _triton("linear_fwd", x2d, weight)
    if fn is not None:
        out = fn(x2d, weight, bias, x.dtype)
    else:
        acc = _partial_2d(x2d, weight)
        out = (acc + bias.float() if bias is not None else acc).to(x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


@_linear_partial_op.register_fake
def _(x, weight):
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=_acc_dtype(x, weight))


@_linear_op.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])


def _cublas(*operands: Tensor) -> bool:
    """Whether a backward matmul goes to cuBLAS: CUDA operands of one fp32/bf16/fp16 dtype.

    cuBLAS repeats bit for bit for a given shape, and gradients only have to repeat (the
    generator never computes them); it is several times faster than the invariant kernel at
    training shapes. CPU keeps the reference tree, whose K-shards combine exactly (the TP tests)."""
    first = operands[0]
    return first.is_cuda and first.dtype != torch.float64 and all(t.dtype == first.dtype for t in operands)


def _grad_mm(a: Tensor, b: Tensor) -> Tensor:
    """a @ b in a's dtype, fp32 accumulation."""
    return torch.mm(a, b) if _cublas(a, b) else _partial_2d(a, b.t()).to(a.dtype)


def _grads(ctx, grad: Tensor) -> tuple[Optional[Tensor], Optional[Tensor], Tensor]:
    """grad_x = grad @ W, grad_W = grad^T @ x (the reduction over tokens)."""
    x, w = ctx.saved_tensors
    # linear_partial's grad is fp32 while bf16 operands stay bf16: take grads in the operands'
    # dtype, as autograd of (x @ w.T).float() does.
    g2d = grad.reshape(-1, grad.shape[-1]).to(x.dtype)
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = _grad_mm(g2d, w).reshape(x.shape)
    if ctx.needs_input_grad[1]:
        grad_w = _grad_mm(g2d.t(), x.reshape(-1, x.shape[-1])).to(w.dtype)
    return grad_x, grad_w, g2d


def _linear_partial_backward(ctx, grad):
    grad_x, grad_w, _ = _grads(ctx, grad)
    return grad_x, grad_w


def _linear_backward(ctx, grad):
    grad_x, grad_w, g2d = _grads(ctx, grad)
    grad_b = None
    if ctx.needs_input_grad[2]:
        grad_b = _partial_2d(g2d.new_ones(1, g2d.shape[0]), g2d.t()).reshape(-1).to(ctx.bias_dtype)
    return grad_x, grad_w, grad_b


def _setup_linear(ctx, inputs, output):
    _setup(ctx, inputs, output)
    ctx.bias_dtype = inputs[2].dtype if inputs[2] is not None else None


_linear_partial_op.register_autograd(_linear_partial_backward, setup_context=_setup)
_linear_op.register_autograd(_linear_backward, setup_context=_setup_linear)


@op("linear_group", mutates_args=())
def _linear_group_op(x: Tensor, w0: Tensor, w1: Optional[Tensor], w2: Optional[Tensor]) -> Tensor:
    # Three weight slots, not a list: autograd.Function (the eager path) tracks no tensor in a list.
    weights = [w for w in (w0, w1, w2) if w is not None]
    for w in weights:
        _check(x, w)
    x2d = x.reshape(-1, x.shape[-1])
    fn = _triton("linear_group_fwd", x2d, weights[0])
    if fn is not None:
        out = fn(x2d, weights, x.dtype)
    else:
        out = torch.cat([_partial_2d(x2d, w).to(x.dtype) for w in weights], dim=-1)
    return out.reshape(*x.shape[:-1], out.shape[-1])


@_linear_group_op.register_fake
def _(x, w0, w1, w2):
    return x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in (w0, w1, w2) if w is not None)))


def _setup_group(ctx, inputs, output):
    x, *slots = inputs
    ctx.slots = [w is not None for w in slots]
    ctx.save_for_backward(x, *(w for w in slots if w is not None))


def _linear_group_backward(ctx, grad):
    """grad_W_i as in linear; grad_x = sum_i grad_i @ W_i, on CPU as fp32 partials added in
    weight order and rounded once (what the TP backward rebuilds from its ranks)."""
    x, *weights = ctx.saved_tensors
    g2d = grad.reshape(-1, grad.shape[-1]).to(x.dtype)
    x2d = x.reshape(-1, x.shape[-1])
    cols = list(accumulate((w.shape[0] for w in weights), initial=0))
    grad_x = None
    if ctx.needs_input_grad[0]:
        if _cublas(g2d, *weights):
            grad_x = torch.mm(g2d, weights[0] if len(weights) == 1 else torch.cat(weights))
        else:
            parts = [_partial_2d(g2d[:, c0:c1], w.t()) for w, c0, c1 in zip(weights, cols, cols[1:])]
            grad_x = sum(parts[1:], parts[0]).to(x.dtype)
        grad_x = grad_x.reshape(x.shape)
    grads_w = [None] * len(ctx.slots)
    filled = [slot for slot, present in enumerate(ctx.slots) if present]
    for slot, w, c0, c1 in zip(filled, weights, cols, cols[1:]):
        if ctx.needs_input_grad[1 + slot]:
            grads_w[slot] = _grad_mm(g2d[:, c0:c1].t(), x2d).to(w.dtype)
    return (grad_x, *grads_w)


_linear_group_op.register_autograd(_linear_group_backward, setup_context=_setup_group)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """x [..., K], weight [N, K], bias [N] | None -> [..., N] in x's dtype (fp32 accumulation)."""
    return _linear_op(x, weight, bias)


def linear_group(x: Tensor, weights: "list[Tensor] | tuple[Tensor, ...]") -> Tensor:
    """x [..., K], weights [N_i, K] (1-3) -> [..., sum N_i] = cat of `linear(x, w_i)` (no bias)."""
    if not 0 < len(weights) <= 3:
        raise ValueError(f"linear_group takes 1-3 weights sharing x, got {len(weights)}")
    return _linear_group_op(x, *weights, *([None] * (3 - len(weights))))


def linear_partial(x: Tensor, weight_shard: Tensor) -> Tensor:
    """x [..., K_shard], weight_shard [N, K_shard] -> fp32 [..., N]: this shard's subtree."""
    return _linear_partial_op(x, weight_shard)
