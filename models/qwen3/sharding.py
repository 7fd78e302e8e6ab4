"""Tensor-parallel layout of lockstep's Qwen3, as data.

Which dim of each weight is split across the TP group (weights are [out, in]):
colwise (dim 0, output features / heads): wq, wk, wv, w1, w3; rowwise (dim 1, input
features): wo, w2; vocab (dim 0): tok_embeddings, output. Everything else (the RMSNorm
weights, q_norm/k_norm included) is replicated. The trainer turns this into DTensor
placements (Shard(dim) / Replicate()); generator-side loaders cut their rank's slice with
`tp_shard`. KV heads must divide evenly by the TP size (no KV-head replication here).
"""

from fnmatch import fnmatchcase

import torch

# name pattern (lockstep/TorchTitan names) -> dim split on the TP axis
_TP_SHARD_DIMS: dict[str, int] = {
    "tok_embeddings.weight": 0,
    "layers.*.attention.wq.weight": 0,
    "layers.*.attention.wk.weight": 0,
    "layers.*.attention.wv.weight": 0,
    "layers.*.attention.wo.weight": 1,
    "layers.*.feed_forward.w1.weight": 0,
    "layers.*.feed_forward.w3.weight": 0,
    "layers.*.feed_forward.w2.weight": 1,
    "output.weight": 0,
}


def tp_placements() -> dict[str, int]:
    """name pattern -> shard dim on the TP axis; names matching none are replicated."""
    return dict(_TP_SHARD_DIMS)


def tp_shard_dim(name: str) -> int | None:
    """The TP shard dim of parameter `name`, or None when it is replicated."""
    for pattern, dim in _TP_SHARD_DIMS.items():
        if fnmatchcase(name, pattern):
            return dim
    return None


def tp_shard(name: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's contiguous slice of the full tensor `name` (the whole tensor if replicated)."""
    dim = tp_shard_dim(name)
    if dim is None or tp_size == 1:
        return full
    size = full.shape[dim]
    if size % tp_size:
        raise ValueError(f"{name}: dim {dim} of size {size} does not split into tp_size={tp_size} equal parts")
    size_per_rank = size // tp_size
    return full.narrow(dim, tp_rank * size_per_rank, size_per_rank)
