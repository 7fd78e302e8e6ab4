"""Weights as one flat buffer per trainer rank, and back into any receiver's layout.

Plain functions (no Monarch, no torchstore); actors/weight_sync.py moves the buffers.

A trainer rank packs every block of weights it owns (the local shard of a DTensor, or a
whole plain tensor on rank 0) back to back into one uint8 buffer on its device, described
by `Block`s: name, dtype, where the block sits in the full tensor (offsets, shape) and where
its bytes sit in the buffer. A receiver asks for, per name, a destination (a full tensor, or
a DTensor's local shard) and copies in the intersection of every block with it: torchstore's
resharding rule (intersect the stored slice with the requested one), on whole buffers.

On CUDA the buffer can stay on the GPU: `export_cuda` turns it into a CUDA IPC handle that a
process on the same host opens with `open_cuda`, so the receiver copies device to device
straight into its own parameters.
"""

import socket
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import _StridedShard

ALIGN_BYTES = 64  # every block starts aligned, so a byte slice views as any dtype


@dataclass(frozen=True)
class Block:
    """One contiguous block of a weight inside a rank's flat buffer."""

    name: str
    dtype: torch.dtype
    global_shape: tuple[int, ...]  # the full tensor
    offsets: tuple[int, ...]  # where the block starts in the full tensor, per dim
    shape: tuple[int, ...]  # the block's shape
    byte_offset: int  # in the flat buffer

    @property
    def num_bytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class LocalShard:
    """A receiver's block of a full tensor held as a plain tensor (a vLLM TP rank's rows):
    `local` sits at `offsets` in a tensor of `global_shape`. `owner`: the one holder of these
    elements that counts them in fingerprints (rows several ranks replicate: the first)."""

    local: torch.Tensor
    offsets: tuple[int, ...]
    global_shape: tuple[int, ...]
    owner: bool = True

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.global_shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    def empty_like(self) -> "LocalShard":
        return LocalShard(torch.empty_like(self.local), self.offsets, self.global_shape, self.owner)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _dtensor_block(t: DTensor) -> tuple[tuple[int, ...], bool]:
    """(offsets of this rank's shard in the full tensor, whether this rank publishes it).

    A shard replicated over a mesh dim is published by coordinate 0 of that dim only."""
    for p in t.placements:
        # FSDP over TP rows is _StridedShard: still one contiguous box of rows per rank (the
        # fingerprint check after each sync would catch a layout where it is not).
        if not isinstance(p, (Shard, Replicate, _StridedShard)):
            raise NotImplementedError(
                f"weight sync: placement {p} is not supported (only Shard and Replicate); "
                "call full_tensor() or redistribute before pushing"
            )
    coordinate = t.device_mesh.get_coordinate()
    _, offsets = _compute_local_shape_and_global_offset(t.shape, t.device_mesh.shape, coordinate, t.placements)
    owner = all(c == 0 for c, p in zip(coordinate, t.placements) if isinstance(p, Replicate))
    return tuple(offsets), owner


def local_blocks(state_dict: dict[str, torch.Tensor], rank: int) -> list[tuple[str, torch.Tensor, tuple]]:
    """(name, local tensor, offsets) of every block this rank publishes: its DTensor shards,
    and plain tensors on rank 0. Empty shards are left out."""
    out = []
    for name, t in state_dict.items():
        if isinstance(t, DTensor):
            offsets, owner = _dtensor_block(t)
            local = t.to_local()
        else:
            offsets, owner, local = (0,) * t.dim(), rank == 0, t
        if owner and local.numel():
            out.append((name, local.detach(), offsets))
    return out


def pack(state_dict: dict[str, torch.Tensor], rank: int, device: torch.device | None = None
         ) -> tuple[torch.Tensor, list[Block]]:
    """This rank's blocks as one flat uint8 buffer (on `device`, default the tensors' own) and
    their layout."""
    full_shapes = {n: tuple(t.shape) for n, t in state_dict.items()}
    return pack_blocks([(name, local, offsets, full_shapes[name])
                        for name, local, offsets in local_blocks(state_dict, rank)], device)


def pack_blocks(items: list[tuple[str, torch.Tensor, tuple, tuple]], device: torch.device | None = None
                ) -> tuple[torch.Tensor, list[Block]]:
    """(name, block, offsets in the full tensor, full shape) -> flat buffer and layout: one
    allocation and one copy per block, all on one device."""
    blocks, num_bytes = [], 0
    for name, local, offsets, global_shape in items:
        num_bytes = -(-num_bytes // ALIGN_BYTES) * ALIGN_BYTES
        blocks.append(Block(name, local.dtype, tuple(global_shape), tuple(offsets), tuple(local.shape), num_bytes))
        num_bytes += blocks[-1].num_bytes
    if device is None:
        device = items[0][1].device if items else torch.device("cpu")
    flat = torch.empty(num_bytes, dtype=torch.uint8, device=device)  # [num_bytes]
    with torch.no_grad():
        for block, (_, local, _, _) in zip(blocks, items):
            flat[block.byte_offset : block.byte_offset + block.num_bytes].copy_(
                local.detach().contiguous().reshape(-1).view(torch.uint8)
            )
    return flat, blocks


def block_view(flat: torch.Tensor, block: Block) -> torch.Tensor:
    """The block's tensor inside a flat buffer (a view, no copy)."""
    raw = flat[block.byte_offset : block.byte_offset + block.num_bytes]
    return raw.view(block.dtype).view(block.shape)


def destination(target: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(tensor to write, its offsets in the full tensor): a DTensor's local shard, a
    LocalShard's block, or the whole plain tensor. Writes go through detached views
    (Parameters that require grad)."""
    if isinstance(target, LocalShard):
        return target.local.detach(), tuple(target.offsets)
    if isinstance(target, DTensor):
        local = target.to_local()
        _, offsets = _compute_local_shape_and_global_offset(
            target.shape, target.device_mesh.shape, target.device_mesh.get_coordinate(), target.placements
        )
        return local.detach(), tuple(offsets)
    return target.detach(), (0,) * target.dim()


def copy_blocks(flat: torch.Tensor, blocks: list[Block], dests: dict[str, tuple[torch.Tensor, tuple]],
                num_copied: dict[str, int]) -> None:
    """Copy the intersection of every block with its name's destination; count the elements
    copied per name (the caller checks that every destination was covered)."""
    with torch.no_grad():
        for block in blocks:
            if block.name not in dests:
                continue
            dest, dest_offsets = dests[block.name]
            src_index, dest_index, numel = [], [], 1
            for b_off, b_len, d_off, d_len in zip(block.offsets, block.shape, dest_offsets, dest.shape):
                lo, hi = max(b_off, d_off), min(b_off + b_len, d_off + d_len)
                if hi <= lo:
                    break
                src_index.append(slice(lo - b_off, hi - b_off))
                dest_index.append(slice(lo - d_off, hi - d_off))
                numel *= hi - lo
            else:
                dest[tuple(dest_index)].copy_(block_view(flat, block)[tuple(src_index)])
                num_copied[block.name] = num_copied.get(block.name, 0) + numel


# --- CUDA IPC: the buffer stays on the GPU ----------------------------------------------------


@dataclass(frozen=True)
class CudaBuffer:
    """A flat CUDA buffer of another process on `host`, as torch's CUDA IPC reduction of it."""

    host: str
    num_bytes: int
    rebuild_args: tuple  # torch.multiprocessing.reductions.rebuild_cuda_tensor's arguments


_DEVICE_ARG = 6  # rebuild_cuda_tensor's storage_device


def export_cuda(flat: torch.Tensor) -> CudaBuffer:
    """The IPC handle of `flat`. The caller keeps `flat` alive while anyone may open it."""
    from torch.multiprocessing.reductions import reduce_tensor

    torch.cuda.current_stream(flat.device).synchronize()  # the packing copies are done
    _, args = reduce_tensor(flat)
    return CudaBuffer(host=socket.gethostname(), num_bytes=flat.numel(), rebuild_args=tuple(args))


def open_cuda(buffer: CudaBuffer, device: torch.device) -> torch.Tensor:
    """Map another process's buffer into this one, addressed from `device` (a peer GPU on the
    same host is read over NVLink / PCIe; no host copy). Raises if `buffer` is on another host."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    if buffer.host != socket.gethostname():
        raise RuntimeError(
            f"weight sync: the trainer shared its weights as CUDA IPC handles on host {buffer.host!r}, "
            f"but this receiver runs on {socket.gethostname()!r}; start the store with transport='host'"
        )
    args = list(buffer.rebuild_args)
    # The exporter's device index means nothing here (each role sees its own GPUs): open the
    # handle from the receiver's device, which maps the peer GPU's memory.
    args[_DEVICE_ARG] = device.index if device.index is not None else torch.cuda.current_device()
    return rebuild_cuda_tensor(*args)
