"""Weight transfer trainer -> generator through torchstore: its one home.

Controller (once, after spawning the trainer procs; storage volumes live on those procs):

    await weight_sync.start_store(await meshes.procs("trainer"), transport=weight_sync.transport_for("cuda", 1))
    ...
    await weight_sync.stop_store()

Trainer, on EVERY rank of its world (collective):

    await weight_sync.push_state_dict(hf_state_dict, version)   # DTensor shards or plain tensors

Generator, on every rank:

    state_dict = await weight_sync.pull_state_dict(version, like)  # like: {hf_name: Tensor | DTensor}

No per-parameter round trips: each trainer rank packs all its blocks into one flat buffer
(actors/weight_pack.py) and publishes that buffer under one key, in one of two transports:

  host      the buffer itself, in host memory, through torchstore's put/get (the storage volume
            keeps it; parts of at most MAX_PART_BYTES each). Works everywhere.
  cuda_ipc  the buffer stays on the trainer's GPU; torchstore holds its CUDA IPC handle. A
            generator on the same host opens it and copies device to device into its own
            parameters (no host copy). The trainer keeps the buffers of the versions in the store.

Store layout (HF parameter names inside the manifest, not in keys):
    policy/v{N}/rank{r}/part{p}   rank r's flat buffer (host) or its CUDA IPC handle (cuda_ipc)
    policy/v{N}/manifest          {names: {hf_name: (shape, dtype)}, ranks: [RankLayout]}, written
                                  after every rank's buffer is in
    policy/latest                 N, the newest complete version
    weight_sync/transport         the transport start_store chose
After pushing N, versions older than N-1 are deleted (N-1 stays for a generator still reading it).
"""

import asyncio
import math
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torchstore as ts
from monarch.actor import current_rank, endpoint, get_or_spawn_controller
from torch.distributed.tensor import DTensor
from torchstore.controller import Controller
from torchstore.strategy import SingletonStrategy, TorchStoreStrategy

from lockstep.actors import weight_pack
from lockstep.actors.weight_pack import Block, CudaBuffer, LocalShard

STORE_NAME = "lockstep"
POLICY_PREFIX = "policy/"
LATEST_KEY = "policy/latest"
TRANSPORT_KEY = "weight_sync/transport"
MANIFEST = "manifest"
TRANSPORTS = ("host", "cuda_ipc")
MAX_PART_BYTES = 256 << 20  # one torchstore message per part: well under Monarch's frame limit
_VERSION_RE = re.compile(r"^policy/v(\d+)/")


def policy_version_key(version: int) -> str:
    """The prefix every key of one weight version shares: "policy/v{N}"."""
    return f"{POLICY_PREFIX}v{version}"


def part_key(version: int, rank: int, part: int) -> str:
    return f"{policy_version_key(version)}/rank{rank}/part{part}"


def manifest_key(version: int) -> str:
    return f"{policy_version_key(version)}/{MANIFEST}"


def transport_for(device: str, num_hosts: int) -> str:
    """cuda_ipc when every role is on the GPUs of one host; host otherwise."""
    return "cuda_ipc" if device == "cuda" and num_hosts == 1 else "host"


@dataclass(frozen=True)
class RankLayout:
    """What one trainer rank published for a version."""

    transport: str  # "host" | "cuda_ipc"
    num_parts: int  # keys under policy/v{N}/rank{r}/
    blocks: list[Block]


class AsyncController(Controller):
    """torchstore 0.1.2's Controller with every endpoint async.

    Its Controller mixes sync and async endpoints, which Monarch 0.7 refuses to spawn.
    torchstore has no option for the controller class, but it finds its controller by name
    with `get_or_spawn_controller(store_name, Controller)`, which returns whatever actor
    already holds that name. So `_store_controller()` spawns this class under STORE_NAME
    before torchstore's first lookup, and every later lookup (any process) gets it.
    """

    @endpoint
    async def get_controller_strategy(self) -> TorchStoreStrategy:
        return Controller.get_controller_strategy._method(self)

    @endpoint
    async def locate_volumes(self, key: str):
        return Controller.locate_volumes._method(self, key)

    @endpoint
    async def notify_put(self, key: str, request, storage_volume_id: str) -> None:
        return Controller.notify_put._method(self, key, request, storage_volume_id)

    @endpoint
    async def keys(self, prefix=None) -> list[str]:
        return Controller.keys._method(self, prefix)

    @endpoint
    async def notify_delete(self, key: str, storage_volume_id: str) -> None:
        return Controller.notify_delete._method(self, key, storage_volume_id)


class MeshRankStrategy(TorchStoreStrategy):
    """One storage volume per proc of the volume mesh; a writer puts into the volume whose
    rank equals its own rank in its mesh (modulo the number of volumes). With the volumes on
    the trainer procs, each trainer rank keeps its shards in its own process."""

    @classmethod
    def get_volume_id(cls) -> str:
        return str(current_rank().rank)

    def get_client_id(self) -> str:
        return str(current_rank().rank % len(self.volume_id_to_coord))


async def _store_controller():
    return await get_or_spawn_controller(STORE_NAME, AsyncController)


async def _client():
    await _store_controller()  # install the async controller before torchstore looks it up
    return await ts.client(STORE_NAME)


async def start_store(volume_procs, transport: str = "host") -> None:
    """Controller side: one storage volume on each proc of `volume_procs` (e.g. the trainer's);
    `transport` (see the module docstring; `transport_for` picks it from the mesh) for every push."""
    if transport not in TRANSPORTS:
        raise ValueError(f"weight sync transport {transport!r}: must be one of {list(TRANSPORTS)}")
    await _store_controller()
    num_volumes = len(volume_procs)
    strategy = SingletonStrategy() if num_volumes == 1 else MeshRankStrategy()
    await ts.initialize(num_storage_volumes=num_volumes, strategy=strategy, store_name=STORE_NAME, mesh=volume_procs)
    await (await _client()).put(TRANSPORT_KEY, transport)


async def _transport(client) -> str:
    return await client.get(TRANSPORT_KEY) if await client.exists(TRANSPORT_KEY) else "host"


async def stop_store(timeout_s: float = 60.0) -> None:
    """Controller side: drop every stored key; the volumes go away with their procs."""
    try:
        await asyncio.wait_for(ts.shutdown(STORE_NAME), timeout_s)
    except asyncio.TimeoutError:
        raise RuntimeError(f"torchstore did not shut down within {timeout_s:.0f} s (are the volume procs gone?)") from None
    finally:
        # A shutdown that failed (its volume procs died) leaves torchstore's cached client
        # pointing at them; the next start_store (a restart) must not reuse it.
        ts.reset_client(STORE_NAME)


# Trainer side: the CUDA buffers whose handles are in the store, by version (they must outlive
# every reader; dropped with their version's keys).
_exported: dict[int, torch.Tensor] = {}


async def push_state_dict(state_dict: dict[str, torch.Tensor], version: int) -> None:
    """Trainer side, collective over the trainer world: store `state_dict` as `version`.

    DTensors: every rank publishes its own shard (any Shard/Replicate placements). Plain
    tensors: rank 0 does. Returns once `version` is complete and older ones are gone.
    """
    client = await _client()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    transport = await _transport(client)
    flat, blocks = weight_pack.pack(state_dict, rank)
    if transport == "cuda_ipc" and flat.is_cuda:
        _exported[version] = flat
        await client.put(part_key(version, rank, 0), weight_pack.export_cuda(flat))
        layout = RankLayout("cuda_ipc", 1, blocks)
    else:
        flat = flat.cpu()
        # A part travels pickled, and a pickled view carries its whole storage: copy each out.
        parts = [flat] if flat.numel() <= MAX_PART_BYTES else [p.clone() for p in flat.split(MAX_PART_BYTES)]
        parts = parts if flat.numel() else []
        await asyncio.gather(*(client.put(part_key(version, rank, i), p) for i, p in enumerate(parts)))
        layout = RankLayout("host", len(parts), blocks)
    for old in [v for v in _exported if v < version - 1]:
        del _exported[old]
    layouts = [layout]
    if world_size > 1:  # also the barrier: every rank's buffer is in before the version is announced
        layouts = [None] * world_size
        dist.all_gather_object(layouts, layout)
    if rank != 0:
        return
    manifest = {
        "names": {name: (tuple(t.shape), t.dtype) for name, t in state_dict.items()},
        "ranks": layouts,
    }
    await client.put(manifest_key(version), manifest)
    await client.put(LATEST_KEY, version)
    stale = [k for k in await _policy_keys(client) if (m := _VERSION_RE.match(k)) and int(m.group(1)) < version - 1]
    await asyncio.gather(*(client.delete(k) for k in stale))


async def pull_state_dict(
    version: int, like: dict[str, torch.Tensor], *, inplace: bool = False
) -> dict[str, torch.Tensor]:
    """Generator side: fetch `version` into the caller's own layout.

    `like` gives, per HF name, the tensor to match: a plain tensor gets the full tensor, a
    DTensor or a `LocalShard` (a vLLM TP rank's rows) gets exactly its block: the trainer's
    blocks are intersected with it, and only the trainer ranks whose blocks overlap it are read.
    Device and dtype follow `like` (a dtype cast is copy_'s round-to-nearest-even). With
    inplace=True the tensors of `like` are overwritten and returned; otherwise new ones are.
    """
    client = await _client()
    manifest = await _manifest(client, version)
    names = manifest["names"]
    missing, extra = sorted(set(names) - set(like)), sorted(set(like) - set(names))
    if missing or extra:
        raise ValueError(
            f"policy version {version}: names differ from the receiver's; "
            f"in store only: {missing[:5]}, in receiver only: {extra[:5]}"
        )
    out, dests = {}, {}
    for name, target in like.items():
        shape, _ = names[name]
        if tuple(target.shape) != shape:
            raise ValueError(f"policy version {version}: {name} has shape {shape} in the store but {tuple(target.shape)} here")
        if inplace:
            out[name] = target
        else:
            out[name] = target.empty_like() if isinstance(target, LocalShard) else torch.empty_like(target)
        dests[name] = weight_pack.destination(out[name])
    devices = {dest.device for dest, _ in dests.values()}
    device = devices.pop() if len(devices) == 1 else torch.device("cpu")

    num_copied: dict[str, int] = {}
    wanted = [(rank, layout) for rank, layout in enumerate(manifest["ranks"]) if _overlaps(layout.blocks, dests)]
    for rank, layout in wanted:
        flat = await _fetch(client, version, rank, layout, device)
        weight_pack.copy_blocks(flat, layout.blocks, dests, num_copied)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the copies are done before a CUDA IPC mapping is released
        del flat
    for name, (dest, _) in dests.items():
        if num_copied.get(name, 0) != dest.numel():
            raise RuntimeError(
                f"policy version {version}: {name} received {num_copied.get(name, 0)} of its {dest.numel()} "
                "elements; the trainer's shards do not cover it"
            )
    return out


def _overlaps(blocks: list[Block], dests: dict) -> bool:
    """Whether any block intersects its name's destination (a rank with none is not read)."""
    for b in blocks:
        if b.name not in dests:
            continue
        dest, offsets = dests[b.name]
        if all(max(bo, do) < min(bo + bl, do + dl)
               for bo, bl, do, dl in zip(b.offsets, b.shape, offsets, dest.shape)):
            return True
    return False


async def _fetch(client, version: int, rank: int, layout: RankLayout, device: torch.device) -> torch.Tensor:
    """Rank `rank`'s flat buffer, readable from `device`."""
    if layout.transport == "cuda_ipc":
        handle: CudaBuffer = await client.get(part_key(version, rank, 0))
        if device.type == "cuda":
            return weight_pack.open_cuda(handle, device)
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"policy version {version}: the trainer shared its weights on the GPU (transport cuda_ipc) "
                "but this receiver has no GPU; start the store with transport='host'"
            )
        # Receivers in host memory (e.g. vLLM's stock loader's buffers): one device-to-host copy.
        return weight_pack.open_cuda(handle, torch.device("cuda", torch.cuda.current_device())).cpu()
    parts = await asyncio.gather(*(client.get(part_key(version, rank, i)) for i in range(layout.num_parts)))
    flat = torch.cat(parts) if len(parts) > 1 else (parts[0] if parts else torch.empty(0, dtype=torch.uint8))
    return flat.to(device)  # one host-to-device copy of the whole buffer on a GPU receiver


async def latest_version() -> int | None:
    """Newest complete version in the store, or None before the first push."""
    client = await _client()
    if not await client.exists(LATEST_KEY):
        return None
    return await client.get(LATEST_KEY)


async def stored_versions() -> list[int]:
    """Versions with any key still in the store (after cleanup: at most the last two)."""
    client = await _client()
    keys = await _policy_keys(client)
    return sorted({int(m.group(1)) for k in keys if (m := _VERSION_RE.match(k))})


async def _policy_keys(client) -> list[str]:
    # torchstore's prefix filter matches whole "."-separated parts; filter on the plain prefix here.
    return [k for k in await client.keys() if k.startswith(POLICY_PREFIX)]


async def _manifest(client, version: int) -> dict:
    key = manifest_key(version)
    if not await client.exists(key):
        latest = await latest_version()
        raise RuntimeError(f"policy version {version} is not in the store (latest complete version: {latest}); push it first")
    return await client.get(key)


# --- fingerprints ------------------------------------------------------------------------
#
# A fingerprint is a checksum of each logical tensor's bits that comes out the same for any
# layout (full, FSDP Shard(0), TP Shard(1), uneven shards): word i of the flattened logical
# tensor contributes bits_i * A * (i + 1) mod M, and the contributions of the pieces add up.
# Trainer and generators compare them after each sync, so a transfer that left a stale or
# corrupt weight is caught before sampling, named by parameter. The sum is linear in the
# index, so it is computed from exact per-axis sums of the bits (a few cheap passes).

FINGERPRINT_MODULUS = 2**31 - 1  # a prime; a weight A*(i+1) is 0 mod M only at i = M-1
_INDEX_MUL = 1_103_515_245
_CHUNK_ELEMENTS = 1 << 18  # words per pass on CPU: one reused int64 buffer that stays in cache
_CUDA_CHUNK_ELEMENTS = 1 << 24  # on a GPU: 128 MiB of int64; small passes cost a launch each
_WORD_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


@dataclass(frozen=True)
class WeightFingerprint:
    """`tensors`: HF name -> (shape, dtype, checksum) of the logical (full) tensor."""

    version: int
    tensors: dict[str, tuple[tuple[int, ...], str, int]]

    def first_difference(self, other: "WeightFingerprint") -> str | None:
        """None if equal, else a short phrase naming the first differing parameter (our order)."""
        if self.version != other.version:
            return f"policy version v{other.version} instead of v{self.version}"
        for name, (shape, dtype, checksum) in self.tensors.items():
            if name not in other.tensors:
                return f"{name} is missing"
            o_shape, o_dtype, o_checksum = other.tensors[name]
            if (shape, dtype) != (o_shape, o_dtype):
                return f"{name} is {o_dtype}{list(o_shape)}, not {dtype}{list(shape)}"
            if checksum != o_checksum:
                return f"{name} differs (checksum {o_checksum:#010x}, expected {checksum:#010x})"
        extra = sorted(set(other.tensors) - set(self.tensors))
        return f"{extra[0]} is unexpected" if extra else None


def _block_checksum(local: torch.Tensor, global_shape: tuple[int, ...], offset: tuple[int, ...]) -> int:
    """sum_i bits_i * A * (i + 1) mod M over the words of one block at `offset` in a tensor of
    `global_shape` (i: the word's index in the flattened logical tensor). Elements wider
    than 32 bits count as several words."""
    words_per_element = max(1, local.element_size() // 4)
    if math.prod(global_shape) * words_per_element >= FINGERPRINT_MODULUS:
        raise ValueError(f"fingerprint: a tensor of {math.prod(global_shape)} elements is too large (limit 2**31 words)")
    local = local.detach().contiguous()
    if words_per_element > 1:  # e.g. float64: two 32-bit words per element, one more axis
        local = local.view(torch.int32).reshape(*local.shape, words_per_element)
        global_shape, offset = (*global_shape, words_per_element), (*offset, 0)
    if local.ndim == 0:
        local, global_shape, offset = local.reshape(1), (1,), (0,)
    words = local.view(_WORD_DTYPES[local.element_size()])
    word_mask = (1 << (8 * local.element_size())) - 1
    strides = [math.prod(global_shape[d + 1:]) for d in range(len(global_shape))]
    row_numel = max(1, words[0].numel())
    chunk_elements = _CUDA_CHUNK_ELEMENTS if words.is_cuda else _CHUNK_ELEMENTS
    rows_per_chunk = max(1, chunk_elements // row_numel)
    buffer = torch.empty(min(rows_per_chunk, words.shape[0]) * row_numel, dtype=torch.int64, device=words.device)
    # sum_i bits_i * (i + 1) = sum(bits) + sum_d stride_d * sum_k coordinate_k * (bits summed
    # over the other axes). Every term is reduced mod M before it can leave int64; it stays on
    # the device until the end (one sync per tensor).
    m = FINGERPRINT_MODULUS
    total = torch.zeros((), dtype=torch.int64, device=words.device)
    for row0 in range(0, words.shape[0], rows_per_chunk):
        chunk = words[row0:row0 + rows_per_chunk]
        bits = buffer[:chunk.numel()].view(chunk.shape)
        bits.copy_(chunk).bitwise_and_(word_mask)  # unsigned, < 2**32
        for d in range(bits.ndim):
            others = [e for e in range(bits.ndim) if e != d]
            per_coordinate = (bits.sum(dim=others) if others else bits) % m  # exact sums of < 2**31 words
            start = offset[d] + (row0 if d == 0 else 0)
            coordinates = torch.arange(start, start + bits.shape[d], dtype=torch.int64, device=bits.device)
            term = (per_coordinate * coordinates % m).sum() % m  # products < 2**31 * 2**32
            total = (total + term * (strides[d] % m)) % m
            if d == 0:
                total = (total + per_coordinate.sum()) % m
    return _INDEX_MUL * int(total) % m


def fingerprint(state_dict: dict[str, torch.Tensor], version: int, group=None) -> WeightFingerprint:
    """Fingerprint of the logical weights, the same whatever their layout.

    Plain tensors are taken as full. DTensors contribute their local shard (replicas only
    once) and are summed over their mesh: a collective, so every rank of that mesh must call.
    `LocalShard`s (a vLLM TP rank's rows) are summed over `group` (a process group), likewise.
    """
    partials, meshes = [], set()
    for name, tensor in state_dict.items():
        if isinstance(tensor, LocalShard):
            if group is None:
                raise ValueError(f"fingerprint: {name} is a LocalShard; pass the process group its ranks form")
            local = tensor.local
            partials.append(_block_checksum(local, tensor.global_shape, tensor.offsets)
                            if tensor.owner and local.numel() else 0)
        elif isinstance(tensor, DTensor):
            from torch.distributed.tensor import Partial, Replicate
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            mesh, placements = tensor.device_mesh, tensor.placements
            if any(isinstance(p, Partial) for p in placements):
                raise ValueError(f"fingerprint: {name} holds partial sums (a Partial placement); reduce it first")
            meshes.add(mesh)
            coordinate = mesh.get_coordinate()
            duplicate = any(isinstance(p, Replicate) and coordinate[d] != 0 for d, p in enumerate(placements))
            _, offset = compute_local_shape_and_global_offset(tensor.shape, mesh, placements)
            local = tensor.to_local()
            partials.append(0 if duplicate or local.numel() == 0 else _block_checksum(local, tuple(tensor.shape), offset))
        else:
            partials.append(_block_checksum(tensor, tuple(tensor.shape), (0,) * tensor.ndim))
    if len(meshes) > 1:
        raise ValueError("fingerprint: the DTensors live on different device meshes; fingerprint each mesh's apart")
    if meshes:
        (mesh,) = meshes
        sums = torch.tensor(partials, dtype=torch.int64, device=mesh.device_type)
        for dim in range(mesh.ndim):  # summing along each mesh dim in turn sums over every rank
            dist.all_reduce(sums, group=mesh.get_group(dim))
        partials = [int(s) % FINGERPRINT_MODULUS for s in sums.cpu()]
    elif group is not None and any(isinstance(t, LocalShard) for t in state_dict.values()):
        sums = torch.tensor(partials, dtype=torch.int64)
        dist.all_reduce(sums, group=group)
        partials = [int(s) % FINGERPRINT_MODULUS for s in sums]
    tensors = {
        name: (tuple(t.shape), str(t.dtype).removeprefix("torch."), checksum)
        for (name, t), checksum in zip(state_dict.items(), partials)
    }
    return WeightFingerprint(version=version, tensors=tensors)
