"""Weight transfer trainer -> generator through torchstore: its one home.

Controller (once, after spawning the trainer procs; storage volumes live on those procs):

    await weight_sync.start_store(await meshes.procs("trainer"))
    ...
    await weight_sync.stop_store()

Trainer, on EVERY rank of its world (collective: it ends with a barrier):

    await weight_sync.push_state_dict(hf_state_dict, version)   # DTensor shards or plain tensors

Generator, on every rank:

    state_dict = await weight_sync.pull_state_dict(version, like)  # like: {hf_name: Tensor | DTensor}

Store layout (HF parameter names; the trainer converts with its state-dict adapter first):
    policy/v{N}/{hf_name}   one tensor; a DTensor is stored as its shards, resharded on get
    policy/v{N}/manifest    {hf_name: (shape, dtype)} written after every rank's shards are in
    policy/latest           N, the newest complete version
After pushing N, versions older than N-1 are deleted (N-1 stays for a generator still reading it).
"""

import asyncio
import re

import torch
import torch.distributed as dist
import torchstore as ts
from monarch.actor import current_rank, endpoint, get_or_spawn_controller
from torch.distributed.tensor import DTensor
from torchstore.controller import Controller
from torchstore.strategy import SingletonStrategy, TorchStoreStrategy
from torchstore.transport.pipe import Request

STORE_NAME = "lockstep"
POLICY_PREFIX = "policy/"
LATEST_KEY = "policy/latest"
MANIFEST = "manifest"
_VERSION_RE = re.compile(r"^policy/v(\d+)/")


def policy_version_key(version: int) -> str:
    """The prefix every key of one weight version shares: "policy/v{N}"."""
    return f"{POLICY_PREFIX}v{version}"


def param_key(version: int, name: str) -> str:
    return f"{policy_version_key(version)}/{name}"


def manifest_key(version: int) -> str:
    return f"{policy_version_key(version)}/{MANIFEST}"


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


async def start_store(volume_procs) -> None:
    """Controller side: one storage volume on each proc of `volume_procs` (e.g. the trainer's)."""
    await _store_controller()
    num_volumes = len(volume_procs)
    strategy = SingletonStrategy() if num_volumes == 1 else MeshRankStrategy()
    await ts.initialize(num_storage_volumes=num_volumes, strategy=strategy, store_name=STORE_NAME, mesh=volume_procs)


async def stop_store(timeout_s: float = 60.0) -> None:
    """Controller side: drop every stored key; the volumes go away with their procs."""
    try:
        await asyncio.wait_for(ts.shutdown(STORE_NAME), timeout_s)
    except asyncio.TimeoutError:
        raise RuntimeError(f"torchstore did not shut down within {timeout_s:.0f} s (are the volume procs gone?)") from None


async def push_state_dict(state_dict: dict[str, torch.Tensor], version: int) -> None:
    """Trainer side, collective over the trainer world: store `state_dict` as `version`.

    DTensors: every rank puts its own shard (any placements). Plain tensors: rank 0 puts.
    Tensors go to the store on CPU. Returns once `version` is complete and older ones are gone.
    """
    if MANIFEST in state_dict:
        raise ValueError(f"parameter name {MANIFEST!r} is reserved by weight_sync; rename it")
    client = await _client()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    for name, tensor in state_dict.items():
        if isinstance(tensor, DTensor) or rank == 0:
            # DTensor.to keeps the spec and moves only the local shard (as FSDP's CPU offload does).
            await client.put(param_key(version, name), tensor.detach().to("cpu"))
    if world_size > 1:
        dist.barrier()  # every rank's shards are in before the version is announced
    if rank != 0:
        return
    manifest = {name: (tuple(t.shape), t.dtype) for name, t in state_dict.items()}
    await client.put(manifest_key(version), manifest)
    await client.put(LATEST_KEY, version)
    for key in await _policy_keys(client):
        match = _VERSION_RE.match(key)
        if match and int(match.group(1)) < version - 1:
            await client.delete(key)


async def pull_state_dict(
    version: int, like: dict[str, torch.Tensor], *, inplace: bool = False
) -> dict[str, torch.Tensor]:
    """Generator side: fetch `version` into the caller's own layout.

    `like` gives, per HF name, the tensor to match: a plain tensor gets the full tensor, a
    DTensor gets exactly its local shard (torchstore reshards from the trainer's placements).
    Device and dtype follow `like` (a dtype cast is copy_'s round-to-nearest-even). With
    inplace=True the tensors of `like` are overwritten and returned; otherwise new ones are.
    """
    client = await _client()
    manifest = await _manifest(client, version)
    missing, extra = sorted(set(manifest) - set(like)), sorted(set(like) - set(manifest))
    if missing or extra:
        raise ValueError(
            f"policy version {version}: names differ from the receiver's; "
            f"in store only: {missing[:5]}, in receiver only: {extra[:5]}"
        )
    out = {}
    for name, target in like.items():
        shape, _ = manifest[name]
        if tuple(target.shape) != shape:
            raise ValueError(f"policy version {version}: {name} has shape {shape} in the store but {tuple(target.shape)} here")
        dest = target if inplace else torch.empty_like(target)
        # Writes go through detached views: same storage, and legal for Parameters that require grad.
        if isinstance(dest, DTensor):
            # Fetch just this rank's slice into the local shard; works whether the trainer
            # stored a DTensor (resharded) or one plain tensor (sliced).
            spec = Request.from_dtensor(dest).tensor_slice
            await client.get(param_key(version, name), inplace_tensor=dest.to_local().detach(), tensor_slice_spec=spec)
        else:
            await client.get(param_key(version, name), inplace_tensor=dest.detach())
        out[name] = dest
    return out


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
    # torchstore's prefix filter matches whole "."-separated parts, and HF names contain
    # dots, so filter here.
    return [k for k in await client.keys() if k.startswith(POLICY_PREFIX)]


async def _manifest(client, version: int) -> dict:
    key = manifest_key(version)
    if not await client.exists(key):
        latest = await latest_version()
        raise RuntimeError(f"policy version {version} is not in the store (latest complete version: {latest}); push it first")
    return await client.get(key)
