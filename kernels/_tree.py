"""Fixed-order sums: the only way lockstep kernels reduce.

A sum over a dim is cut into tiles of `tile` elements (the last one zero padded). Inside a
tile the elements are folded by halving (`x[:h] + x[h:]`), and the tile partials are folded
in the balanced tree of `tree_fold`. Every step is an elementwise add, so the result for
one row never depends on how many rows there are (torch's own `sum` may split a reduction
across threads depending on the output size).
"""

import functools

import torch
from torch import Tensor


def tree_fold(parts: Tensor | list[Tensor]) -> Tensor:
    """Balanced tree over `parts` (a list, or a tensor's dim 0).

    tree(p[0:n]) = tree(p[0:ceil(n/2)]) + tree(p[ceil(n/2):n]). A contiguous run of n/S parts
    (S a power of two dividing n) is a subtree, which is what makes K and vocab shards combine
    into exactly the unsplit result. Computed level by level: the leaves go to their slots in
    a perfect tree of next_pow2(n) leaves, the empty slots hold zeros (x + 0 == x).
    """
    n = len(parts)
    if n == 0:
        raise ValueError("tree_fold needs at least one part")
    if not isinstance(parts, Tensor):
        parts = torch.stack(list(parts))
    if n & (n - 1):
        slots = torch.tensor(_leaf_slots(n), device=parts.device)
        full = parts.new_zeros((1 << (n - 1).bit_length(), *parts.shape[1:]))
        full[slots] = parts
        parts = full
    while parts.shape[0] > 1:
        parts = parts[0::2] + parts[1::2]
    return parts[0]


@functools.lru_cache(maxsize=None)
def _leaf_slots(n: int) -> tuple[int, ...]:
    """Slot of each of n leaves in a perfect tree of next_pow2(n) slots (ceil split)."""
    if n == 1:
        return (0,)
    half_slots = 1 << (n - 1).bit_length() - 1
    left = -(-n // 2)
    return _leaf_slots(left) + tuple(half_slots + s for s in _leaf_slots(n - left))


def halving_sum(x: Tensor) -> Tensor:
    """Sum over dim 1 of `x [num_tiles, tile, ...]` (tile a power of two) by halving."""
    while x.shape[1] > 1:
        half = x.shape[1] // 2
        x = x[:, :half] + x[:, half:]
    return x[:, 0]


def tiled_sum(x: Tensor, dim: int, tile: int) -> Tensor:
    """Sum of `x` over `dim` (removed) in fixed tiles of `tile` (a power of two)."""
    if tile & (tile - 1):
        raise ValueError(f"tile must be a power of two, got {tile}")
    x = x.movedim(dim, 0)
    n, rest = x.shape[0], x.shape[1:]
    num_full = n // tile
    parts = []
    if num_full:
        # Splitting dim 0 into (tiles, tile) is a view: no copy of x.
        parts.append(halving_sum(x[: num_full * tile].reshape(num_full, tile, *rest)))
    if n % tile or n == 0:
        last = x.new_zeros((1, tile, *rest))  # the ragged last tile, zero padded
        last[0, : n % tile] = x[num_full * tile :]
        parts.append(halving_sum(last))
    return tree_fold(parts[0] if len(parts) == 1 else torch.cat(parts))
