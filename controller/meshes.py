"""Hosts and proc meshes of one run, from a MeshConfig: the only place procs are made.

    async with Meshes(load_mesh_config("local-2host")) as meshes:
        trainer = await meshes.spawn_role("trainer", TrainerActor, model_cfg, trainer_cfg, meshes.layout("trainer"))
        await weight_sync.start_store(await meshes.procs("trainer"))
        ...
    # leaving the block stops every proc mesh and the hosts this run started (also on error)

The hosts come from Monarch's job launchers, by `launcher.kind` (local, processes, slurm,
hosts: see controller/hosts.py), as one HostMesh. A role's procs are spawned once, on first
use, on the slice of it that the role's `hosts` names, with:
- one per-host dim, "gpus" on GPU roles and "procs" otherwise; proc rank r is the row-major
  index into `meshes.layout(role)` (rank = dp_index * tp + tp_index) and lives on host
  hosts[r // per_host]; `spawn_role` returns the actor mesh flattened to that one dim;
- CUDA_VISIBLE_DEVICES = the role's GPUs on that host (`MeshConfig.gpu_ids`); reward procs see
  none unless `reward.gpus`. LOCAL_RANK indexes into those, so proc r uses cuda:LOCAL_RANK
  (torchrun style; a reward proc narrows them to its own `reward.gpus`);
- torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR/PORT, ...) set by Monarch's own
  `setup_torch_elastic_env_async`: MASTER_ADDR is the role's first host, so
  `lockstep.actors.dist.init_distributed` joins the role's world across its hosts.
Every host runs the controller's Python at the same path (a shared filesystem or one image).
"""

import asyncio

from monarch.actor import Actor, HostMesh, ProcMesh, default_bootstrap_cmd
from monarch.spmd import setup_torch_elastic_env_async

from lockstep.actors.dist import Layout
from lockstep.controller.hosts import (HOSTS_DIM, HostError, Hosts, close_hosts, launch_plan, lost_host_error, lost_hosts,
                                      open_hosts)
from lockstep.controller.mesh_config import ROLES, MeshConfig

WEIGHT_SYNC_ROLES = ("trainer", "generator")  # procs that use torchstore (volumes, push, pull)
STOP_TIMEOUT_S = 60.0  # per proc mesh; a mesh on a lost host never answers


class Meshes:
    """Hosts and proc meshes of one run; `shutdown()` (or `async with`) stops them all."""

    def __init__(self, mesh_cfg: MeshConfig):
        self.cfg = mesh_cfg
        self._hosts: asyncio.Task | None = None  # task making the Hosts
        self._spawns: dict[str, asyncio.Task] = {}  # role -> task making its ProcMesh

    def layout(self, role: str) -> Layout:
        return self.cfg.layout(role)

    async def host_mesh(self) -> HostMesh:
        """The run's hosts, found (and, for processes / slurm, started) on first call."""
        return (await self._open()).mesh

    async def procs(self, role: str) -> ProcMesh:
        """The role's proc mesh, spawned (and its torch.distributed env set up) on first call."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles are {list(ROLES)}")
        if role not in self._spawns:
            self._spawns[role] = asyncio.ensure_future(self._spawn_procs(role))
        return await self._spawns[role]

    async def start(self, roles: tuple[str, ...] = ROLES) -> None:
        """Spawn several roles' procs at once (faster than one by one on many-core hosts)."""
        await asyncio.gather(*(self.procs(r) for r in roles))

    async def spawn_role(self, role: str, actor_cls: type[Actor], *args, name: str | None = None, **kwargs):
        """Spawn `actor_cls(*args, **kwargs)` on every proc of `role`; returns the actor mesh
        handle, one flat dim over all the role's hosts (its index is the proc's rank)."""
        procs = await self.procs(role)
        actors = procs.spawn(name or role, actor_cls, *args, **kwargs)
        return actors.flatten(_per_host_dim(self.cfg, role)) if HOSTS_DIM in procs.sizes else actors

    async def lost_host_error(self) -> HostError | None:
        """If a host's worker no longer answers, the error naming it and the roles it ran; else
        None. Cheap (a local connect per host): call it when a call on the meshes failed."""
        if self._hosts is None or not self._hosts.done() or self._hosts.exception() is not None:
            return None
        return await lost_host_error(self.cfg, self._hosts.result())

    async def shutdown(self) -> None:
        """Stop every proc mesh this object spawned (their procs exit), then the hosts it started."""
        spawns, self._spawns = dict(self._spawns), {}
        hosts_task, self._hosts = self._hosts, None
        starting = [t for t in (*spawns.values(), hosts_task) if t is not None and not t.done()]
        for task in starting:
            task.cancel()  # still starting, e.g. Ctrl-C while a SLURM job waits in the queue
        await asyncio.gather(*starting, return_exceptions=True)
        # never found: nothing to close (a failed start closes its own job)
        hosts = hosts_task.result() if hosts_task is not None and _succeeded(hosts_task) else None
        # A mesh on a lost host cannot be stopped (its procs went with the worker): its stop may
        # never answer, so it is not waited for.
        lost = set(await lost_hosts(hosts)) if hosts is not None else set()
        procs = [t.result() for role, t in spawns.items()  # a failed spawn has nothing to stop
                 if _succeeded(t) and not lost & set(self.cfg.role(role).hosts)]
        results = await asyncio.gather(*(asyncio.wait_for(_stop(p), STOP_TIMEOUT_S) for p in procs), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if hosts is not None:
            # A host lost before or while stopping: its error (reported by the caller) is the one that matters.
            if errors and (lost or await lost_hosts(hosts)):
                errors = []
            await close_hosts(hosts)
        if errors:
            raise RuntimeError(f"stopping {len(errors)} proc mesh(es) failed: {errors[0]!r}") from errors[0]

    async def __aenter__(self) -> "Meshes":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.shutdown()

    async def _open(self) -> Hosts:
        if self._hosts is None:
            self._hosts = asyncio.ensure_future(open_hosts(self.cfg))
        return await self._hosts

    async def _spawn_procs(self, role: str) -> ProcMesh:
        cfg = self.cfg
        host_mesh = await self.host_mesh()
        hosts = cfg.role(role).hosts
        if HOSTS_DIM in host_mesh.sizes:  # a slice() range keeps the dim, even for one host
            host_mesh = host_mesh.slice(**{HOSTS_DIM: slice(hosts[0], hosts[-1] + 1)})

        def command(point) -> object:  # point: this proc's coordinates on the sliced mesh
            host = hosts[dict(point).get(HOSTS_DIM, 0)]
            return default_bootstrap_cmd().with_env(proc_env(cfg, role, host))

        procs = host_mesh.spawn_procs(
            per_host={_per_host_dim(cfg, role): cfg.procs_per_host(role)},
            bootstrap=_warm_imports if role in WEIGHT_SYNC_ROLES else None,
            name=role,
            bootstrap_command=command,
        )
        await procs.initialized
        await setup_torch_elastic_env_async(procs)
        return procs


def proc_env(cfg: MeshConfig, role: str, host: int = 0) -> dict[str, str]:
    """Environment a role's procs start with on `host`: on GPU meshes, the role's GPUs only
    (a reward without `reward.gpus` gets "", so it never touches the trainer's or generator's).
    Simulated hosts (launcher processes) share this machine: host h's GPU i is h * gpus + i."""
    if cfg.device != "cuda":
        return {}
    offset = host * cfg.gpus if cfg.launcher.kind == "processes" else 0
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(offset + i) for i in cfg.gpu_ids(role, host))}


def describe(cfg: MeshConfig) -> str:
    """What --dry-run prints: how the hosts are found, then every proc's host, rank and GPU."""
    per_host = f"{cfg.gpus} GPUs" if cfg.device == "cuda" else f"{cfg.procs} CPU procs"
    total = f" = {cfg.hosts * cfg.gpus} GPUs" if cfg.device == "cuda" else ""
    lines = [f"mesh {cfg.name}: {cfg.hosts} host{'s' if cfg.hosts > 1 else ''} x {per_host}{total}, launcher {cfg.launcher.kind}"]
    lines += [f"  {line}" for line in launch_plan(cfg)]
    for host in range(cfg.hosts):
        on_host = []
        for role in ROLES:
            if host in cfg.role(role).hosts:
                gpus = cfg.gpu_ids(role, host)
                where = f"GPUs {_ranges(gpus)}" if gpus else "CPU"
                on_host.append(f"{role} {cfg.procs_per_host(role)} procs ({where})")
        lines.append(f"  host {host}: {', '.join(on_host) or 'nothing'}")
    lines.append(f"{'role':<10} {'host':>4} {'rank':>4} {'gpu':>5}  layout")
    for p in cfg.placement():
        coords = " ".join(f"{d}={i}" for d, i in p.coords)
        lines.append(f"{p.role:<10} {p.host:>4} {p.rank:>4} {_ranges(list(p.gpus)) or '-':>5}  {coords}")
    return "\n".join(lines)


def _ranges(ids: list[int]) -> str:
    return f"{ids[0]}-{ids[-1]}" if len(ids) > 1 and ids == list(range(ids[0], ids[-1] + 1)) else ",".join(map(str, ids))


def _per_host_dim(cfg: MeshConfig, role: str) -> str:
    return "gpus" if cfg.device == "cuda" and role != "reward" else "procs"  # reward: one proc, reward.gpus GPUs


async def _stop(procs: ProcMesh) -> None:
    await procs.stop()


def _succeeded(task: asyncio.Task) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


def _warm_imports() -> None:
    """Runs first in every trainer and generator proc. torchstore's modules import each other in a cycle that breaks
    ("partially initialized module torchstore.storage_volume") when two actors of one proc
    import it at once, e.g. a storage volume and a trainer; importing it here, alone, avoids it."""
    import lockstep.actors.weight_sync  # noqa: F401  (imports torchstore)


