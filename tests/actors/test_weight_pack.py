"""Flat weight buffers: packing a rank's blocks and copying them into other layouts, bitwise.

Shards here are built by hand (as FSDP's uneven Shard(0) and a TP Shard(1) would cut them);
the DTensor path over real meshes is in test_weight_sync.py.
"""

import os
import subprocess
import sys

import pytest
import torch

from lockstep.actors import weight_pack
from lockstep.actors.weight_pack import ALIGN_BYTES, block_view, copy_blocks, destination, pack, pack_blocks


def full_weights():
    g = torch.Generator().manual_seed(0)
    return {
        "embed": torch.randn(7, 6, generator=g).to(torch.bfloat16),  # odd rows: uneven shards
        "down": torch.randn(5, 8, generator=g),
        "norm": torch.randn(6, generator=g),
        "scale": torch.tensor(0.5, dtype=torch.float64),  # 0-dim
        "steps": torch.arange(3, dtype=torch.int64),
    }


def row_shards(full: dict, num_ranks: int) -> list[list[tuple]]:
    """FSDP-style: dim 0 cut in torch.chunk pieces; 0-dim tensors whole on rank 0."""
    ranks = [[] for _ in range(num_ranks)]
    for name, t in full.items():
        if t.dim() == 0:
            ranks[0].append((name, t, (), ()))
            continue
        start = 0
        for r, piece in enumerate(t.chunk(num_ranks, dim=0)):
            ranks[r].append((name, piece, (start,) + (0,) * (t.dim() - 1), tuple(t.shape)))
            start += piece.shape[0]
    return ranks


def test_pack_aligns_every_block_and_views_it_back_bitwise():
    full = full_weights()
    flat, blocks = pack(full, rank=0)
    assert flat.dtype == torch.uint8 and flat.dim() == 1
    assert [b.name for b in blocks] == list(full)
    for b in blocks:
        assert b.byte_offset % ALIGN_BYTES == 0 and b.offsets == (0,) * len(b.shape)
        assert torch.equal(block_view(flat, b), full[b.name])
    # plain tensors are published by rank 0 only
    flat1, blocks1 = pack(full, rank=1)
    assert blocks1 == [] and flat1.numel() == 0


def test_uneven_row_shards_reach_full_and_column_sharded_receivers():
    full = full_weights()
    buffers = [pack_blocks(items) for items in row_shards(full, 3)]  # 7 rows: 3 + 3 + 1

    # a receiver holding whole tensors
    got = {n: torch.zeros_like(t) for n, t in full.items()}
    dests = {n: destination(t) for n, t in got.items()}
    copied = {}
    for flat, blocks in buffers:
        copy_blocks(flat, blocks, dests, copied)
    assert copied == {n: t.numel() for n, t in full.items()}
    for name, t in full.items():
        assert torch.equal(got[name], t), name

    # two TP ranks holding column halves of the 2-D weights (what a DTensor receiver asks for)
    for tp_rank in range(2):
        dests, pieces = {}, {}
        for name, t in full.items():
            if t.dim() == 2:
                piece = t.chunk(2, dim=1)[tp_rank]
                offsets = (0, tp_rank * t.chunk(2, dim=1)[0].shape[1])
            else:
                piece, offsets = t, (0,) * t.dim()
            pieces[name] = piece
            dests[name] = (torch.zeros_like(piece), offsets)
        copied = {}
        for flat, blocks in buffers:
            copy_blocks(flat, blocks, dests, copied)
        for name, (dest, _) in dests.items():
            assert copied[name] == dest.numel() and torch.equal(dest, pieces[name]), (tp_rank, name)


def test_a_missing_shard_shows_in_the_counts():
    full = full_weights()
    rank0, _ = row_shards(full, 2)  # rank 1's rows never arrive
    flat, blocks = pack_blocks(rank0)
    dests = {n: destination(torch.zeros_like(t)) for n, t in full.items()}
    copied = {}
    copy_blocks(flat, blocks, dests, copied)
    assert copied["embed"] == 4 * 6 < full["embed"].numel()
    assert copied["scale"] == 1


def test_dtype_cast_and_parameter_destinations():
    full = {"w": torch.randn(4, 3)}
    flat, blocks = pack(full, 0)
    param = torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.bfloat16))
    copied = {}
    copy_blocks(flat, blocks, {"w": destination(param)}, copied)
    assert torch.equal(param.detach(), full["w"].to(torch.bfloat16))  # copy_'s rounding, as .to()


# --- CUDA IPC ---------------------------------------------------------------------------------

_CHILD = r"""
import sys, torch
from lockstep.actors import weight_pack
handle = torch.load(sys.argv[1], weights_only=False)
dest = torch.zeros(handle["num_elements"], dtype=torch.float32, device="cuda")
flat = weight_pack.open_cuda(handle["buffer"], dest.device)
weight_pack.copy_blocks(flat, handle["blocks"], {"w": (dest, (0,))}, {})
torch.cuda.synchronize()
torch.save(dest.cpu(), sys.argv[2])
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("peer", [False, True])
def test_cuda_ipc_buffer_is_read_device_to_device_by_another_process(tmp_path, peer):
    """Another process (on the other GPU when `peer`, seeing only it, as a generator on the
    h200x2 mesh does) opens the trainer's buffer and copies a block into its own tensor."""
    if peer and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    w = torch.randn(1 << 20, device="cuda:0")
    flat, blocks = pack({"w": w}, 0)
    torch.save({"buffer": weight_pack.export_cuda(flat), "blocks": blocks, "num_elements": w.numel()},
               tmp_path / "handle.pt")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") or ",".join(map(str, range(torch.cuda.device_count())))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=visible.split(",")[1 if peer else 0])
    subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "handle.pt"), str(tmp_path / "out.pt")],
                   env=env, check=True, timeout=300)
    assert torch.equal(torch.load(tmp_path / "out.pt"), w.cpu())
    del flat  # kept alive until the reader was done


def test_open_cuda_refuses_a_buffer_from_another_host():
    buffer = weight_pack.CudaBuffer(host="some-other-host", num_bytes=4, rebuild_args=())
    with pytest.raises(RuntimeError, match="start the store with transport='host'"):
        weight_pack.open_cuda(buffer, torch.device("cuda", 0))


def test_tp_row_receivers_get_their_rows_and_read_only_overlapping_ranks():
    """A vLLM TP rank holds rows of each matrix as a LocalShard: it receives exactly those
    rows from FSDP row shards, and a trainer rank whose rows miss them all is not read."""
    from lockstep.actors.weight_pack import LocalShard
    from lockstep.actors.weight_sync import _overlaps

    g = torch.Generator().manual_seed(1)
    full = {"wq": torch.randn(8, 4, generator=g), "wo": torch.randn(8, 6, generator=g)}
    buffers = [pack_blocks(items) for items in row_shards(full, 4)]  # 2 rows per trainer rank
    for tp_rank in range(2):
        shards = {n: LocalShard(torch.zeros(4, t.shape[1]), (4 * tp_rank, 0), tuple(t.shape)) for n, t in full.items()}
        assert all(s.shape == full[n].shape for n, s in shards.items())  # checked against the store's shapes
        dests = {n: destination(s) for n, s in shards.items()}
        wanted = [r for r, (_, blocks) in enumerate(buffers) if _overlaps(blocks, dests)]
        assert wanted == [2 * tp_rank, 2 * tp_rank + 1]  # the two trainer ranks holding its rows
        copied = {}
        for r in wanted:
            copy_blocks(*buffers[r], dests, copied)
        for name, shard in shards.items():
            assert copied[name] == shard.local.numel()
            assert torch.equal(shard.local, full[name][4 * tp_rank : 4 * tp_rank + 4]), (tp_rank, name)
