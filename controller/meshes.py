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
  none. LOCAL_RANK indexes into those, so proc r uses cuda:r within its role (torchrun style);
- torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR/PORT, ...) set by Monarch's own
  `setup_torch_elastic_env_async`, so `lockstep.actors.dist.init_distributed` can join the
  role's world from inside any actor.
"""

import asyncio

from monarch.actor import Actor, ProcMesh, default_bootstrap_cmd, this_host
from monarch.spmd import setup_torch_elastic_env_async

from lockstep.actors.dist import Layout
from lockstep.controller.mesh_config import ROLES, MeshConfig


class Meshes:
    """Proc meshes of one run, keyed by role; `shutdown()` (or `async with`) stops them all."""

    def __init__(self, mesh_cfg: MeshConfig):
        self.cfg = mesh_cfg
        self._procs: dict[str, ProcMesh] = {}
        self._lock = asyncio.Lock()

    def layout(self, role: str) -> Layout:
        return self.cfg.layout(role)

    async def procs(self, role: str) -> ProcMesh:
        """The role's proc mesh, spawned (and its torch.distributed env set up) on first call."""
        async with self._lock:
            if role not in self._procs:
                self._procs[role] = await _spawn_procs(self.cfg, role)
            return self._procs[role]

    async def spawn_role(self, role: str, actor_cls: type[Actor], *args, name: str | None = None, **kwargs):
        """Spawn `actor_cls(*args, **kwargs)` on every proc of `role`; returns the actor mesh handle."""
        procs = await self.procs(role)
        return procs.spawn(name or role, actor_cls, *args, **kwargs)

    async def shutdown(self) -> None:
        """Stop every proc mesh this object spawned (their procs exit)."""
        async with self._lock:
            procs, self._procs = self._procs, {}
        results = await asyncio.gather(*(p.stop() for p in procs.values()), return_exceptions=True)
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
    env = {}
    if cfg.device == "cuda":
        # Reward procs get "" (no GPU at all), so they never touch the trainer's or generator's GPUs.
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, cfg.gpu_ids(role, host=0)))
    procs = this_host().spawn_procs(
        per_host={"gpus" if uses_gpus else "procs": cfg.procs_per_host(role)},
        name=role,
        bootstrap_command=default_bootstrap_cmd().with_env(env),
    )
    await procs.initialized
    await setup_torch_elastic_env_async(procs)
    return procs


def _check_can_launch(cfg: MeshConfig) -> None:
    if cfg.launcher.kind != "local":
        raise RuntimeError(
            f"mesh config {cfg.name!r}: launcher {cfg.launcher.kind!r} is not supported yet; "
            "only kind local (this one machine) runs today"
        )
    if cfg.device == "cuda":
        import torch

        num_gpus = torch.cuda.device_count()
        if num_gpus < cfg.gpus:
            raise RuntimeError(
                f"mesh config {cfg.name!r} wants {cfg.gpus} GPUs but this machine has {num_gpus}; "
                "pick a smaller mesh (e.g. --mesh local-cpu)"
            )
