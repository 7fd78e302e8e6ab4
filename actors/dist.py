"""torch.distributed + DeviceMesh inside a Monarch proc: the one helper every role uses.

Each role's proc mesh is its own torch.distributed world (trainer procs form one world,
generator procs another), on one host or spread over several. `controller/meshes.py` runs
Monarch's `setup_torch_elastic_env` on every mesh it spawns, so each proc already holds
torchrun's variables: RANK, WORLD_SIZE, LOCAL_RANK (index among the role's procs on its host),
MASTER_ADDR and MASTER_PORT (the hostname of rank 0, on the role's first host, and a port
free there). Across hosts the rendezvous and gloo/nccl then go over the network: the hostname
must resolve on every host (set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME to pick a NIC). An
actor then calls, once, in `__init__` or its first endpoint:

    self.mesh = init_distributed(layout)   # DeviceMesh with layout.dim_names

Mesh dims: generator ("dp", "tp"), trainer ("dp_shard", "tp"), reward ("dp",). Size-1 dims
are KEPT, so `mesh["tp"]` always exists (size 1 when there is no TP). Ranks are row-major over
the dims, the order `init_device_mesh` uses: rank = dp_index * tp + tp_index.

On GPU each role's procs see only that role's GPUs (CUDA_VISIBLE_DEVICES, set by the spawner)
and proc LOCAL_RANK drives `cuda:LOCAL_RANK`, the torchrun convention vLLM's external launcher
and TorchTitan both follow.
"""

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

ROLE_DIM_NAMES = {
    "generator": ("dp", "tp"),
    "trainer": ("dp_shard", "tp"),
    "reward": ("dp",),
}
BACKENDS = {"cpu": "gloo", "cuda": "nccl"}
_meshes: dict["Layout", DeviceMesh] = {}  # this proc's meshes, built once


@dataclass(frozen=True, slots=True)
class Layout:
    """A role's procs as a named grid. Built by `MeshConfig.layout(role)`; picklable, sent to actors."""

    role: str
    dim_names: tuple[str, ...]
    shape: tuple[int, ...]  # same length as dim_names
    device_type: str  # "cpu" | "cuda"

    def __post_init__(self):
        if len(self.dim_names) != len(self.shape):
            raise ValueError(f"layout {self.role}: dims {self.dim_names} do not match shape {self.shape}")
        if self.device_type not in BACKENDS:
            raise ValueError(f"layout {self.role}: device_type must be one of {sorted(BACKENDS)}, got {self.device_type!r}")

    @property
    def num_procs(self) -> int:
        return math.prod(self.shape)

    def size(self, dim: str) -> int:
        return self.shape[self.dim_names.index(dim)]


def init_distributed(layout: Layout) -> DeviceMesh:
    """Join this proc's role world (gloo on CPU, nccl on GPU) and return its DeviceMesh.

    Idempotent: a second call returns the same DeviceMesh. If torch.distributed is already up
    (e.g. vLLM's external launcher joined the same world first), the mesh is built on top of it.
    """
    device_type = layout.device_type
    if layout in _meshes:
        return _meshes[layout]
    world_size = int(_env("WORLD_SIZE", layout))
    rank = int(_env("RANK", layout))
    if world_size != layout.num_procs:
        raise RuntimeError(
            f"{layout.role}: WORLD_SIZE={world_size} but layout {dict(zip(layout.dim_names, layout.shape))} "
            f"needs {layout.num_procs} procs; spawn the role with controller.meshes.Meshes"
        )
    if device_type == "cuda":
        torch.cuda.set_device(int(_env("LOCAL_RANK", layout)))
    if not dist.is_initialized():
        dist.init_process_group(BACKENDS[device_type], rank=rank, world_size=world_size)
    elif dist.get_world_size() != world_size:
        raise RuntimeError(
            f"{layout.role}: torch.distributed is already initialized with world size "
            f"{dist.get_world_size()}, the layout needs {world_size}"
        )
    mesh = init_device_mesh(device_type, layout.shape, mesh_dim_names=layout.dim_names)
    _meshes[layout] = mesh
    return mesh


def destroy_distributed() -> None:
    """Leave the world (call from an actor's cleanup so NCCL/gloo shut down cleanly)."""
    _meshes.clear()
    if dist.is_initialized():
        dist.destroy_process_group()


def _env(name: str, layout: Layout) -> str:
    value = os.environ.get(name)
    if value is None:
        raise RuntimeError(
            f"{layout.role}: {name} is not set in this proc; spawn the role with "
            "controller.meshes.Meshes (it runs monarch.spmd.setup_torch_elastic_env)"
        )
    return value
