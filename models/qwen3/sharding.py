"""Tensor-parallel layout of lockstep's Qwen3, as data.

No reduction dim of the forward is ever split: a K-split matmul needs its partial sums
combined, and the GPU linear (512-column chains added left to right) gives no split that
recombines into the unsplit bits. So every TP-sharded weight is split on dim 0, its output
features ([out, in] weights): q/k/v and gate/up by heads / intermediate columns, the
embedding and lm_head by vocab rows, and o (wo) and down (w2) by output (hidden) features
too, with their input all-gathered first (parallelize.py). Each output element is then the
same kernel over the same K as on one rank, so TP=N forward bits equal TP=1 for any kernel.
Everything else (the RMSNorm weights, q_norm/k_norm included) is replicated.

KV heads: tp must divide num_kv_heads, or (generator only, no gradients) be a multiple of
it, in which case each rank holds the one KV head its query heads use (replicated rows).
The trainer turns this table into DTensor placements (Shard(0) / Replicate()); generator
loaders cut their rank's rows with `tp_shard`.
"""

from fnmatch import fnmatchcase

import torch

# name pattern (lockstep/TorchTitan names) -> dim split on the TP axis
_TP_SHARD_DIMS: dict[str, int] = {
    "tok_embeddings.weight": 0,
    "layers.*.attention.wq.weight": 0,
    "layers.*.attention.wk.weight": 0,
    "layers.*.attention.wv.weight": 0,
    "layers.*.attention.wo.weight": 0,
    "layers.*.feed_forward.w1.weight": 0,
    "layers.*.feed_forward.w3.weight": 0,
    "layers.*.feed_forward.w2.weight": 0,
    "output.weight": 0,
}
_KV_PATTERNS = ("layers.*.attention.wk.weight", "layers.*.attention.wv.weight")


def tp_placements() -> dict[str, int]:
    """name pattern -> shard dim on the TP axis; names matching none are replicated."""
    return dict(_TP_SHARD_DIMS)


def tp_shard_dim(name: str) -> int | None:
    """The TP shard dim of parameter `name`, or None when it is replicated."""
    for pattern, dim in _TP_SHARD_DIMS.items():
        if fnmatchcase(name, pattern):
            return dim
    return None


def check_tp(config, tp_size: int, *, field: str = "tp", trainer: bool = False) -> None:
    """One-line ValueError unless `config` (a Qwen3Config) splits over `tp_size` ranks.

    `field` names the setting in the message (e.g. "generator layout tp")."""
    if tp_size == 1:
        return
    if tp_size < 1 or tp_size & (tp_size - 1):
        raise ValueError(f"{field}={tp_size}: must be a power of two (1, 2, 4, 8)")
    for name in ("num_heads", "vocab_size", "hidden_size", "intermediate_size"):
        value = getattr(config, name)
        if value % tp_size:
            raise ValueError(f"{field}={tp_size} does not divide the model's {name}={value}; use a tp that divides it")
    kv = config.num_kv_heads
    if kv % tp_size and (trainer or tp_size % kv):
        fix = "a tp that divides it" if trainer else "a tp that divides it or is a multiple of it"
        raise ValueError(f"{field}={tp_size} does not split the model's num_kv_heads={kv}; use {fix}")


def tp_rows(name: str, num_rows: int, tp_rank: int, tp_size: int, num_kv_heads: int | None = None) -> tuple[int, int]:
    """(first row, number of rows) of rank `tp_rank`'s dim-0 slice of weight `name`.

    wk/wv with tp_size a multiple of `num_kv_heads`: the rows of the one KV head this rank's
    query heads use (several ranks hold the same rows)."""
    if tp_shard_dim(name) is None or tp_size == 1:
        return 0, num_rows
    if num_kv_heads is not None and num_kv_heads < tp_size and any(fnmatchcase(name, p) for p in _KV_PATTERNS):
        head_dim = num_rows // num_kv_heads
        return tp_rank * num_kv_heads // tp_size * head_dim, head_dim
    if num_rows % tp_size:
        raise ValueError(f"{name}: {num_rows} rows do not split into tp_size={tp_size} equal parts")
    rows_per_rank = num_rows // tp_size
    return tp_rank * rows_per_rank, rows_per_rank


def tp_shard(name: str, full: torch.Tensor, tp_rank: int, tp_size: int, num_kv_heads: int | None = None) -> torch.Tensor:
    """This rank's contiguous slice of the full tensor `name` (the whole tensor if replicated)."""
    start, length = tp_rows(name, full.shape[0], tp_rank, tp_size, num_kv_heads)
    return full if length == full.shape[0] else full.narrow(0, start, length)
