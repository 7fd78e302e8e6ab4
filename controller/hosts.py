"""The hosts of a run, through Monarch's job launchers (`monarch.job`), by `launcher.kind`:

- local: this machine (`this_host()`, as Monarch's LocalJob);
- processes: ProcessJob, one Monarch worker process per simulated host, all on this machine;
- slurm: outside an allocation, SlurmJob submits one job of `hosts` nodes (partition, account,
  time_limit and GPUs per node from the mesh config) and attaches to the workers it starts.
  Inside one (SLURM_JOB_ID set, e.g. examples/slurm/lockstep.sbatch), the workers are the
  `lockstep worker`s the batch script started, one per node, and the controller attaches;
- hosts: attaches (`attach_to_workers`) to `lockstep worker`s running at the listed addresses.

    hosts = await open_hosts(cfg)          # Hosts: one HostMesh (dim "hosts"), in host order
    error = await lost_host_error(cfg, hosts)  # after a failed call: names a host that is gone
    await close_hosts(hosts)                # kills what this run started (ProcessJob, SlurmJob)

Workers started by the user (hosts, slurm inside an allocation) outlive the run. Every failure
to find a host is a HostError whose one line names the host and what to check.
"""

import asyncio
import ipaddress
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from monarch.actor import HostMesh, attach_to_workers, enable_transport, this_host

from lockstep.controller.handles import MeshError
from lockstep.controller.mesh_config import ROLES, MeshConfig

HOSTS_DIM = "hosts"  # the host mesh's one dim, as Monarch's jobs name it
PROBE_TIMEOUT_S = 2.0
SBATCH_FLAGS = {"partition": "partition", "account": "account", "time_limit": "time"}  # launcher key -> sbatch option


class HostError(MeshError):
    """A host of the mesh cannot be reached, was not granted, or is gone; the message names it.
    A MeshError: a run that loses a host mid-way restarts like one whose actor died (if it may)."""


@dataclass
class Hosts:
    mesh: HostMesh
    addresses: list[str]  # each host's worker: "ipc://...", "tcp://name:port"; "" = this process's host
    job: object | None = None  # the Monarch job this run applied, killed by close_hosts


async def lost_hosts(hosts: Hosts) -> list[int]:
    """The hosts whose worker no longer accepts connections (one local connect per host)."""
    answers = await asyncio.gather(*(_answers(a) for a in hosts.addresses))
    return [h for h, (address, ok) in enumerate(zip(hosts.addresses, answers)) if address and not ok]


async def lost_host_error(cfg: MeshConfig, hosts: Hosts) -> HostError | None:
    """If a host's worker no longer accepts connections, the error naming it (and the roles it
    ran); else None. Cheap (one local connect per host): call it when a call on the meshes failed."""
    lost = await lost_hosts(hosts)
    if not lost:
        return None
    host = lost[0]
    roles = [r for r in ROLES if host in cfg.role(r).hosts] or ["no role"]
    return HostError(
        f"host {host} of mesh {cfg.name!r} is gone: its worker at {_show(hosts.addresses[host])} "
        f"does not answer ({' and '.join(roles)} ran there); {_check_hint(cfg, hosts.addresses[host])}"
    )


async def close_hosts(hosts: Hosts) -> None:
    """Stop what this run started: ProcessJob reaps its workers' process trees, SlurmJob scancels."""
    if hosts.job is not None:
        await asyncio.to_thread(hosts.job.kill)


def launch_plan(cfg: MeshConfig) -> list[str]:
    """How the hosts would be found (the first lines of --dry-run)."""
    launcher = cfg.launcher
    if launcher.kind == "local":
        return ["this machine (Monarch's this_host())"]
    if launcher.kind == "processes":
        return [f"{cfg.hosts} Monarch worker processes on this machine, one per simulated host (ProcessJob)"]
    if launcher.kind == "hosts":
        return [f"host {h}: attach to `lockstep worker` at {n}:{p}" for h, (n, p) in enumerate(launcher.host_addresses())]
    options = [f"--nodes={cfg.hosts}"] + ([f"--gpus-per-node={cfg.gpus}"] if cfg.device == "cuda" else [])
    options += [f"--{flag}={v}" for key, flag in SBATCH_FLAGS.items() if (v := getattr(launcher, key)) is not None]
    return [
        f"outside an allocation: submit one job through Monarch's SlurmJob ({' '.join(options)})",
        f"inside one (SLURM_JOB_ID set): attach to `lockstep worker` on each of its nodes, port {launcher.worker_port}",
    ]


async def open_hosts(cfg: MeshConfig) -> Hosts:
    """Find (and for processes / slurm, start) the mesh's hosts; wait until every one has joined."""
    check_can_launch(cfg)
    kind = cfg.launcher.kind
    if kind == "local":
        return Hosts(this_host(), [""])  # what LocalJob gives, without importing monarch.job (below)
    if kind == "processes":
        job = _jobs().ProcessJob({HOSTS_DIM: cfg.hosts})
        return await _start_job(cfg, job, lambda: _process_addresses(job, cfg.hosts))
    if kind == "slurm" and "SLURM_JOB_ID" not in os.environ:
        return await _submit_slurm(cfg)
    names = _allocation_nodes(cfg) if kind == "slurm" else [n for n, _ in cfg.launcher.host_addresses()]
    ports = [cfg.launcher.worker_port] * len(names) if kind == "slurm" else [p for _, p in cfg.launcher.host_addresses()]
    addresses = [f"tcp://{_bracket(n)}:{p}" for n, p in zip(names, ports)]
    await _wait_reachable(cfg, addresses)
    _enable_tcp(cfg, names)
    mesh = attach_to_workers(name=HOSTS_DIM, ca="trust_all_connections", workers=addresses)
    await _initialized(cfg, mesh, addresses)
    return Hosts(mesh, addresses)


async def _start_job(cfg: MeshConfig, job, addresses) -> Hosts:
    """Apply a Monarch job (if not yet), wait for its hosts; a failure kills whatever it started."""
    try:
        mesh = (await asyncio.to_thread(job.state, cached_path=None)).hosts
        found = addresses()
        await _initialized(cfg, mesh, found)
        return Hosts(mesh, found, job)
    except BaseException:
        await asyncio.to_thread(job.kill)
        raise


async def _submit_slurm(cfg: MeshConfig) -> Hosts:
    launcher = cfg.launcher
    where = f"mesh config {cfg.name!r}: launcher slurm"
    if shutil.which("sbatch") is None:
        raise HostError(
            f"{where} needs `sbatch`, not found here; run on a SLURM login node, or inside an "
            "allocation (examples/slurm/lockstep.sbatch)"
        )
    job = _jobs().SlurmJob(
        {HOSTS_DIM: cfg.hosts},
        python_exe=sys.executable,
        monarch_port=launcher.worker_port,
        job_name=f"lockstep-{cfg.name}",
        partition=launcher.partition,
        account=launcher.account,
        time_limit=launcher.time_limit,
        gpus_per_node=cfg.gpus if cfg.device == "cuda" else None,
    )
    print(f"lockstep: submitting a SLURM job of {cfg.hosts} nodes; waiting until it runs", file=sys.stderr)
    try:
        await asyncio.to_thread(job.apply)  # sbatch: a refused job fails here
    except Exception as e:
        raise HostError(f"{where}: {_first_line(e)}; check its partition, account and time_limit") from None
    try:
        _enable_tcp(cfg, [socket.gethostname()])
    except HostError:
        await asyncio.to_thread(job.kill)  # scancel what was just submitted
        raise
    try:
        return await _start_job(cfg, job, lambda: [f"tcp://{h}:{launcher.worker_port}" for h in job._all_hostnames])
    except HostError:
        raise
    except Exception as e:  # e.g. the job failed or was cancelled in the queue (_start_job scancels it)
        raise HostError(f"{where}: {_first_line(e)}; {_check_hint(cfg)}") from None


def _jobs():
    """monarch.job, imported only when a job is launched: it pulls in Flask, whose proxies break
    vLLM's scan of sys.modules in any process that later runs vLLM (every proc imports
    controller.meshes, and tests run vLLM in the controller's process)."""
    import monarch.job

    # The jobs log each step of their bookkeeping at INFO; keep the console for the run's lines.
    for name in ("monarch._src.job.job", "monarch._src.job.process"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return monarch.job


def _allocation_nodes(cfg: MeshConfig) -> list[str]:
    """The nodes of the SLURM allocation this controller runs in, in SLURM's order (node 0 first)."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        raise HostError(f"mesh config {cfg.name!r}: SLURM_JOB_ID is set but SLURM_JOB_NODELIST is not; run inside `sbatch` or `salloc`")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise HostError(f"mesh config {cfg.name!r}: cannot expand SLURM_JOB_NODELIST={nodelist} with scontrol: {_first_line(e)}") from None
    nodes = out.split()
    if len(nodes) != cfg.hosts:
        raise HostError(
            f"mesh config {cfg.name!r} needs hosts={cfg.hosts} but this SLURM allocation has {len(nodes)} node(s) "
            f"({' '.join(nodes)}); submit it with --nodes={cfg.hosts}"
        )
    return nodes


def _enable_tcp(cfg: MeshConfig, names: list[str]) -> None:
    """Monarch talks to remote workers over TCP; chosen once per process, before its first Monarch call.
    Workers all on this machine (loopback addresses): the controller listens on loopback too."""
    local = all(_is_loopback(n) for n in names)
    if not local and not _hostname_is_routable():
        raise HostError(
            f"mesh config {cfg.name!r}: launcher {cfg.launcher.kind}: this machine's hostname "
            f"{socket.gethostname()!r} resolves only to loopback addresses, so workers on other hosts could "
            "not answer the controller; map it to this machine's network address (/etc/hosts or DNS)"
        )
    transport = "tcp://127.0.0.1:0" if local else "tcp"
    try:
        enable_transport(transport)
    except RuntimeError:
        raise HostError(
            f"mesh config {cfg.name!r}: launcher {cfg.launcher.kind} needs Monarch over TCP, but this Python process "
            "already started Monarch another way (an earlier Session on a local mesh?); use a fresh process "
            "(restart the notebook kernel)"
        ) from None


async def _wait_reachable(cfg: MeshConfig, addresses: list[str]) -> None:
    """Every worker accepts a connection within connect_timeout_s, or one line names the first that does not."""
    deadline = time.monotonic() + cfg.launcher.timeout_s
    waiting = set(range(len(addresses)))
    announced = False
    while True:
        probed = sorted(waiting)
        answers = await asyncio.gather(*(_answers(addresses[h]) for h in probed))
        waiting -= {h for h, ok in zip(probed, answers) if ok}
        if not waiting:
            return
        if time.monotonic() > deadline:
            host = min(waiting)
            raise HostError(
                f"host {host} of mesh {cfg.name!r} cannot be reached: nothing answers at {_show(addresses[host])} "
                f"after {cfg.launcher.timeout_s:.0f} s; {_check_hint(cfg, addresses[host])}"
            )
        if not announced:
            print(f"lockstep: waiting for the worker(s) of host(s) {sorted(waiting)} (up to {cfg.launcher.timeout_s:.0f} s)", file=sys.stderr)
            announced = True
        await asyncio.sleep(1.0)


async def _initialized(cfg: MeshConfig, mesh: HostMesh, addresses: list[str]) -> None:
    try:
        await asyncio.wait_for(mesh.initialized, cfg.launcher.timeout_s)
    except asyncio.TimeoutError:
        raise HostError(
            f"the hosts of mesh {cfg.name!r} ({', '.join(map(_show, addresses))}) did not all join within "
            f"{cfg.launcher.timeout_s:.0f} s; {_check_hint(cfg)}"
        ) from None


async def _answers(address: str) -> bool:
    """Whether a worker's channel accepts a connection (a dead worker's refuses, or its socket is gone)."""
    scheme, _, rest = _channel(address).partition("://")
    try:
        if scheme == "ipc":
            _, writer = await asyncio.wait_for(asyncio.open_unix_connection(rest), PROBE_TIMEOUT_S)
        elif scheme == "tcp":
            name, _, port = rest.rpartition(":")
            _, writer = await asyncio.wait_for(asyncio.open_connection(name.strip("[]"), int(port)), PROBE_TIMEOUT_S)
        else:
            return True  # not a channel we can probe: assume it is there
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


def _process_addresses(job, num_hosts: int) -> list[str]:
    # ProcessJob keeps each worker's channel only in its private table; without it, no diagnosis.
    table = getattr(job, "_host_to_pid", {})
    return [getattr(table.get(f"{HOSTS_DIM}_{h}"), "channel", "") for h in range(num_hosts)]


def _check_hint(cfg: MeshConfig, address: str = "") -> str:
    kind = cfg.launcher.kind
    port = address.rpartition(":")[2] if kind in ("hosts", "slurm") and address else cfg.launcher.worker_port
    if kind == "hosts":
        return f"check that `lockstep worker --port {port}` runs there and the address in mesh config {cfg.name!r}"
    if kind == "slurm" and "SLURM_JOB_ID" in os.environ:
        return f"check that the batch script runs `srun lockstep worker --port {port}` on every node (examples/slurm/lockstep.sbatch)"
    if kind == "slurm":
        return "check the SLURM job's log (slurm_<jobid>_*.out) and the node"
    return "the worker process died or was killed; check this machine's memory and logs"


def _hostname_is_routable() -> bool:
    """Monarch's TCP transport listens on an address this host's name resolves to, not loopback."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None)
    except OSError:
        return False
    ips = {ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos}
    return any(not (ip.is_loopback or ip.is_link_local) for ip in ips)


def _is_loopback(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _bracket(name: str) -> str:
    return f"[{name}]" if ":" in name else name  # an IPv6 literal


def _channel(address: str) -> str:
    """A worker's channel URL, without the service identity ProcessJob puts in front ("service<id>@")."""
    return re.sub(r"^[\w-]*<[^>]*>@", "", address)


def _show(address: str) -> str:
    return _channel(address) or "this machine"


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def check_can_launch(cfg: MeshConfig) -> None:
    """Raise ValueError if this machine is too small for a mesh it would run on its own GPUs."""
    # ValueError: a mesh this machine cannot launch is bad input, reported as one line.
    if cfg.device == "cuda" and cfg.launcher.kind in ("local", "processes"):
        import torch

        needed = cfg.gpus * cfg.hosts  # simulated hosts each take their own GPUs of this machine
        num_gpus = torch.cuda.device_count()
        if num_gpus < needed:
            raise ValueError(
                f"mesh config {cfg.name!r} wants {needed} GPUs but this machine has {num_gpus}; "
                "pick a smaller mesh (e.g. --mesh local-cpu)"
            )
