"""Spawns one Monarch proc mesh per role from a MeshConfig; the only place procs are made.

    async with Meshes(load_mesh_config("local-cpu")) as meshes:
        trainer = await meshes.spawn_role("trainer", TrainerActor, model_cfg, trainer_cfg, meshes.layout("trainer"))
        await weight_sync.start_store(await meshes.procs("trainer"))
        ...
    # leaving the block stops every proc mesh (also on error)

Each role's procs are spawned once, on first use, with:
- one flat per-host dim, "gpus" on GPU roles and "procs" otherwise; proc rank r is the
  row-major index into `meshes.layout(role)` (rank = dp_index * tp + tp_index);
- CUDA_VISIBLE_DEVICES = the role's GPUs on that host (`MeshConfig.gpu_ids`); reward procs see
  none unless `reward.gpus`. LOCAL_RANK indexes into those, so proc r uses cuda:r within its role
  (torchrun style; a reward proc narrows them to its own `reward.gpus`);
- torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR/PORT, ...) set by Monarch's own
  `setup_torch_elastic_env_async`, so `lockstep.actors.dist.init_distributed` can join the
  role's world from inside any actor.
"""

import asyncio

from monarch.actor import Actor, ProcMesh, default_bootstrap_cmd, this_host
from monarch.spmd import setup_torch_elastic_env_async

from lockstep.actors.dist import Layout
from lockstep.controller.mesh_config import ROLES, MeshConfig

WEIGHT_SYNC_ROLES = ("trainer", "generator")  # procs that use torchstore (volumes, push, pull)


class Meshes:
    """Proc meshes of one run, keyed by role; `shutdown()` (or `async with`) stops them all."""

    def __init__(self, mesh_cfg: MeshConfig):
        self.cfg = mesh_cfg
        self._spawns: dict[str, asyncio.Task] = {}  # role -> task making its ProcMesh

    def layout(self, role: str) -> Layout:
        return self.cfg.layout(role)

    async def procs(self, role: str) -> ProcMesh:
        """The role's proc mesh, spawned (and its torch.distributed env set up) on first call."""
        if role not in self._spawns:
            self._spawns[role] = asyncio.ensure_future(_spawn_procs(self.cfg, role))
        return await self._spawns[role]

    async def start(self, roles: tuple[str, ...] = ROLES) -> None:
        """Spawn several roles' procs at once (faster than one by one on many-core hosts)."""
        await asyncio.gather(*(self.procs(r) for r in roles))

    async def spawn_role(self, role: str, actor_cls: type[Actor], *args, name: str | None = None, **kwargs):
        """Spawn `actor_cls(*args, **kwargs)` on every proc of `role`; returns the actor mesh handle."""
        procs = await self.procs(role)
        return procs.spawn(name or role, actor_cls, *args, **kwargs)

    async def shutdown(self) -> None:
        """Stop every proc mesh this object spawned (their procs exit)."""
        spawns, self._spawns = self._spawns, {}
        stops = []
        for task in spawns.values():
            try:
                stops.append((await task).stop())
            except Exception:
                continue  # that spawn failed: nothing of it to stop
        results = await asyncio.gather(*stops, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise RuntimeError(f"stopping {len(errors)} proc mesh(es) failed: {errors[0]!r}") from errors[0]

    async def __aenter__(self) -> "Meshes":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.shutdown()


async def _spawn_procs(cfg: MeshConfig, role: str) -> ProcMesh:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles are {list(ROLES)}")
    _check_can_launch(cfg)
    uses_gpus = cfg.device == "cuda" and role != "reward"
    procs = this_host().spawn_procs(
        per_host={"gpus" if uses_gpus else "procs": cfg.procs_per_host(role)},
        bootstrap=_warm_imports if role in WEIGHT_SYNC_ROLES else None,
        name=role,
        bootstrap_command=default_bootstrap_cmd().with_env(proc_env(cfg, role)),
    )
    await procs.initialized
    await setup_torch_elastic_env_async(procs)
    return procs


def proc_env(cfg: MeshConfig, role: str, host: int = 0) -> dict[str, str]:
    """Environment a role's procs start with on `host`: on GPU meshes, the role's GPUs only
    (a reward without `reward.gpus` gets "", so it never touches the trainer's or generator's)."""
    if cfg.device != "cuda":
        return {}
    return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, cfg.gpu_ids(role, host)))}


def _warm_imports() -> None:
    """Runs first in every trainer and generator proc. torchstore's modules import each other in a cycle that breaks
    ("partially initialized module torchstore.storage_volume") when two actors of one proc
    import it at once, e.g. a storage volume and a trainer; importing it here, alone, avoids it."""
    import lockstep.actors.weight_sync  # noqa: F401  (imports torchstore)


def _check_can_launch(cfg: MeshConfig) -> None:
    # ValueError: a mesh this machine cannot launch is bad input, reported as one line.
    if cfg.launcher.kind != "local":
        raise ValueError(
            f"mesh config {cfg.name!r}: launcher {cfg.launcher.kind!r} is not supported yet; "
            "only kind local (this one machine) runs today"
        )
    if cfg.device == "cuda":
        import torch

        num_gpus = torch.cuda.device_count()
        if num_gpus < cfg.gpus:
            raise ValueError(
                f"mesh config {cfg.name!r} wants {cfg.gpus} GPUs but this machine has {num_gpus}; "
                "pick a smaller mesh (e.g. --mesh local-cpu)"
            )
