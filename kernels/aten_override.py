"""Swap aten's mm, addmm, bmm, _log_softmax and mean for invariant versions, process-wide.

For code we do not own that calls torch ops directly (the generator no longer needs it: its
logprobs come from the model's own log_softmax). The overrides run lockstep's fixed-tile
trees: slower than BLAS, but a row's result no longer depends on the batch. `enable()` /
`disable()`, or `with invariant_mode(): ...`.
"""

import contextlib
import warnings

import torch
from torch import Tensor

from lockstep.kernels._tree import tiled_sum
from lockstep.kernels.linear import TILE_K, _partial_2d
from lockstep.kernels.logprobs import log_softmax as _invariant_log_softmax

_DISPATCH_KEYS = ("CPU", "CUDA")
_lib: torch.library.Library | None = None


def _matmul(a: Tensor, b: Tensor) -> Tensor:
    """a [M, K] @ b [K, N] through the K-tile tree, accumulator not yet rounded."""
    if not a.is_floating_point():
        return tiled_sum(a[:, :, None] * b[None, :, :], dim=1, tile=TILE_K)  # exact for ints
    return _partial_2d(a, b.t())


def _mm(a: Tensor, b: Tensor) -> Tensor:
    return _matmul(a, b).to(a.dtype)


def _addmm(bias: Tensor, a: Tensor, b: Tensor, *, beta=1, alpha=1) -> Tensor:
    acc = _matmul(a, b)
    if alpha != 1:
        acc = acc * alpha
    if beta != 0:
        acc = acc + (bias.to(acc.dtype) if beta == 1 else bias.to(acc.dtype) * beta)
    return acc.to(a.dtype)


def _bmm(a: Tensor, b: Tensor) -> Tensor:
    out = a.new_empty((a.shape[0], a.shape[1], b.shape[2]))
    for i in range(a.shape[0]):
        out[i] = _matmul(a[i], b[i]).to(a.dtype)
    return out


def _log_softmax(x: Tensor, dim: int, half_to_float: bool) -> Tensor:
    moved = x.movedim(dim, -1)
    # Through the op, not the CPU reference: on CUDA this must be the Triton kernel that
    # the trainer's token_logprobs runs, or sampler and trainer logprobs would differ.
    logp = _invariant_log_softmax(moved.reshape(-1, moved.shape[-1]), 1.0).reshape(moved.shape)
    return logp.movedim(-1, dim).to(torch.float32 if half_to_float else x.dtype).contiguous()


def _mean_dim(x: Tensor, dim=None, keepdim: bool = False, *, dtype=None) -> Tensor:
    out_dtype = dtype or x.dtype
    acc_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    dims = sorted({d % max(x.dim(), 1) for d in dim}) if dim else list(range(x.dim()))
    kept = [d for d in range(x.dim()) if d not in dims]
    flat = x.permute(*kept, *dims).reshape(*[x.shape[d] for d in kept], -1).to(acc_dtype)
    count = flat.shape[-1]
    mean = tiled_sum(flat, dim=-1, tile=TILE_K) / count
    if keepdim:
        mean = mean.reshape([1 if d in dims else x.shape[d] for d in range(x.dim())])
    return mean.to(out_dtype)


def enable() -> None:
    """Route aten mm/addmm/bmm/_log_softmax/mean(dim) to invariant versions in this process."""
    global _lib
    if _lib is not None:
        return
    lib = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel": intended
        for key in _DISPATCH_KEYS:
            lib.impl("mm", _mm, key)
            lib.impl("addmm", _addmm, key)
            lib.impl("bmm", _bmm, key)
            lib.impl("_log_softmax", _log_softmax, key)
            lib.impl("mean.dim", _mean_dim, key)
    _lib = lib


def disable() -> None:
    """Give aten its own kernels back."""
    global _lib
    if _lib is not None:
        _lib._destroy()
        _lib = None


def is_enabled() -> bool:
    return _lib is not None


@contextlib.contextmanager
def invariant_mode():
    """`with invariant_mode():` enable() for the block, then restore what was there."""
    was_enabled = is_enabled()
    enable()
    try:
        yield
    finally:
        if not was_enabled:
            disable()
