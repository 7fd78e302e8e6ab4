"""Write new K/V rows into a paged cache [NB, BS, Hkv, D] at slots block * BS + offset."""

import torch
from torch import Tensor

from lockstep.kernels._dispatch import op, triton_fn


def write_kv_cache_reference(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """In place: k_cache[s // BS, s % BS] = k[t] for s = slot_mapping[t] >= 0 (negative = padding)."""
    block_size = k_cache.shape[1]
    slots = slot_mapping.long()
    keep = slots >= 0
    slots, k, v = slots[keep], k[keep], v[keep]
    blk, off = slots // block_size, slots % block_size
    k_cache[blk, off] = k.to(k_cache.dtype)
    v_cache[blk, off] = v.to(v_cache.dtype)


@op("write_kv_cache", mutates_args=("k_cache", "v_cache"))
def _write_kv_cache_op(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k.shape != v.shape or k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(
            "write_kv_cache: k, v [T, Hkv, D] and caches [NB, BS, Hkv, D] disagree: "
            f"{tuple(k.shape)} vs {tuple(k_cache.shape)}"
        )
    if slot_mapping.shape != k.shape[:1]:
        raise ValueError(f"write_kv_cache: slot_mapping must be [T={k.shape[0]}], got {tuple(slot_mapping.shape)}")
    fn = triton_fn("attention", "write_kv_cache") if k.is_cuda else None
    (fn or write_kv_cache_reference)(k, v, k_cache, v_cache, slot_mapping)


@_write_kv_cache_op.register_fake
def _(k, v, k_cache, v_cache, slot_mapping):
    return None


def write_kv_cache(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """k, v [T, Hkv, D] -> k_cache, v_cache [NB, BS, Hkv, D] at slot_mapping int [T] (in place)."""
    _write_kv_cache_op(k, v, k_cache, v_cache, slot_mapping)
