"""Launchers beyond this machine: hosts (`lockstep worker`s), slurm (inside an allocation, and
a refused submission), and the one-line errors when a host cannot be had.

No SLURM cluster here: `sbatch` and `scontrol` are small fakes on PATH, and "nodes" are
`lockstep worker` processes on loopback addresses (127.0.0.1, 127.0.0.2). Monarch picks its
transport once per process, so anything that attaches over TCP runs in a subprocess."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lockstep.controller.hosts import HostError, launch_plan
from lockstep.controller.mesh_config import load_mesh_config
from lockstep.controller.meshes import Meshes

LOCKSTEP = Path(sys.executable).parent / "lockstep"  # the console command, as users run it

# Run in a subprocess: a trainer spread over every host of MESH joins one gloo world across them.
SPAN_SCRIPT = """
import asyncio, json, os, sys
import torch, torch.distributed as dist
from monarch.actor import Actor, endpoint
from lockstep.actors.dist import init_distributed
from lockstep.controller.mesh_config import load_mesh_config
from lockstep.controller.meshes import Meshes

class Rank(Actor):
    def __init__(self, layout):
        self.layout = layout

    @endpoint
    async def all_reduce(self):
        init_distributed(self.layout)
        total = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(total)
        return {"rank": dist.get_rank(), "sum": total.item(), "pid": os.getpid(), "parent": os.getppid(),
                "master": os.environ["MASTER_ADDR"]}

async def main():
    async with Meshes(load_mesh_config(sys.argv[1])) as meshes:
        ranks = await meshes.spawn_role("trainer", Rank, meshes.layout("trainer"))
        print(json.dumps([v for _, v in (await ranks.all_reduce.call()).items()]))

asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_mesh(tmp_path: Path, text: str, name: str = "mine") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def fake_command(tmp_path: Path, name: str, body: str) -> Path:
    """An executable `name` in tmp_path/bin running the shell `body`; returns the bin dir."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return bin_dir


class Workers:
    """`lockstep worker` processes on loopback, as a user would start them on each host."""

    def __init__(self, addresses: list[tuple[str, int]]):
        self.procs = [
            subprocess.Popen([str(LOCKSTEP), "worker", "--host", host, "--port", str(port)], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for host, port in addresses
        ]
        deadline = time.monotonic() + 120
        for host, port in addresses:
            while not _accepts(host, port):
                assert time.monotonic() < deadline, f"lockstep worker at {host}:{port} did not start listening"
                time.sleep(0.5)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            p.wait(timeout=30)


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def run_span(tmp_path: Path, mesh: Path, env: dict | None = None) -> list[dict]:
    script = tmp_path / "span.py"
    script.write_text(SPAN_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(mesh)], capture_output=True, text=True, timeout=600,
                            cwd=tmp_path, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def host_error(cfg) -> str:
    with pytest.raises(HostError) as e:
        asyncio.run(Meshes(cfg).host_mesh())
    message = str(e.value)
    assert "\n" not in message, message
    return message


# -- fast: errors before any Monarch call --


def test_a_worker_that_is_not_there_is_one_line(tmp_path):
    port = free_port()  # nothing listens there
    path = write_mesh(tmp_path, f"device: cpu\nhosts: 1\nprocs: 4\nlauncher: {{kind: hosts, hosts: ['127.0.0.1:{port}'], "
                                f"connect_timeout_s: 1}}\ntrainer: {{dp: 2}}\n")
    assert host_error(load_mesh_config(str(path))) == (
        f"host 0 of mesh 'mine' cannot be reached: nothing answers at tcp://127.0.0.1:{port} after 1 s; "
        f"check that `lockstep worker --port {port}` runs there and the address in mesh config 'mine'"
    )


def test_slurm_outside_a_cluster_says_where_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert host_error(load_mesh_config("h100x16")) == (
        "mesh config 'h100x16': launcher slurm needs `sbatch`, not found here; run on a SLURM login node, "
        "or inside an allocation (examples/slurm/lockstep.sbatch)"
    )


def test_an_allocation_of_the_wrong_size_names_both_sizes(tmp_path, monkeypatch):
    bin_dir = fake_command(tmp_path, "scontrol", 'echo gpu-node-17; echo gpu-node-18; echo gpu-node-19')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu-node-[17-19]")
    assert host_error(load_mesh_config("h100x16")) == (
        "mesh config 'h100x16' needs hosts=2 but this SLURM allocation has 3 node(s) "
        "(gpu-node-17 gpu-node-18 gpu-node-19); submit it with --nodes=2"
    )


def test_launch_plan_names_the_slurm_options_and_worker_addresses(tmp_path):
    slurm = load_mesh_config(str(write_mesh(
        tmp_path, "device: cuda\nhosts: 2\ngpus: 8\nlauncher: {kind: slurm, partition: h100, account: rl, "
        "time_limit: '04:00:00', port: 23456}\ntrainer: {dp: 8, hosts: [1]}\n")))
    assert launch_plan(slurm) == [
        "outside an allocation: submit one job through Monarch's SlurmJob "
        "(--nodes=2 --gpus-per-node=8 --partition=h100 --account=rl --time=04:00:00)",
        "inside one (SLURM_JOB_ID set): attach to `lockstep worker` on each of its nodes, port 23456",
    ]
    hosts = load_mesh_config(str(write_mesh(
        tmp_path, "device: cpu\nhosts: 2\nprocs: 3\nlauncher: {kind: hosts, hosts: [node-a, 'node-b:23000']}\n", "two")))
    assert launch_plan(hosts) == [
        "host 0: attach to `lockstep worker` at node-a:22222",
        "host 1: attach to `lockstep worker` at node-b:23000",
    ]


def test_a_refused_slurm_job_is_one_line_and_asks_for_the_configured_resources(tmp_path):
    script = tmp_path / "submitted.sh"
    bin_dir = fake_command(tmp_path, "sbatch", f'cat > {script}\n'
                           'echo "sbatch: error: Batch job submission failed: Invalid account or account/partition '
                           'combination specified" >&2\nexit 1')
    path = write_mesh(tmp_path, "device: cuda\nhosts: 2\ngpus: 8\nlauncher: {kind: slurm, partition: h100, "
                                "account: nobody, time_limit: '01:00:00'}\ntrainer: {dp: 8, hosts: [1]}\n")
    # SlurmJob sets Monarch's transport for the whole process: run it in its own.
    code = ("import asyncio, sys\nfrom lockstep.controller.hosts import HostError\n"
            "from lockstep.controller.mesh_config import load_mesh_config\nfrom lockstep.controller.meshes import Meshes\n"
            "try:\n    asyncio.run(Meshes(load_mesh_config(sys.argv[1])).host_mesh())\n"
            "except HostError as e:\n    print(f'error: {e}', file=sys.stderr)\n    sys.exit(1)\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("SLURM_JOB_ID", None)
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: mesh config 'mine': launcher slurm: Failed to submit SLURM job: sbatch: error: Batch job submission "
        "failed: Invalid account or account/partition combination specified; check its partition, account and time_limit"
    )
    directives = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    for wanted in ("--nodes=2", "--gpus-per-node=8", "--partition=h100", "--account=nobody", "--time=01:00:00"):
        assert f"#SBATCH {wanted}" in directives, directives


# -- slow: real procs on `lockstep worker` hosts --


@pytest.mark.slow
def test_hosts_launcher_spreads_a_role_over_two_workers(tmp_path, proc_gone):
    ports = [free_port(), free_port()]
    path = write_mesh(tmp_path, f"device: cpu\nhosts: 2\nprocs: 2\nlauncher: {{kind: hosts, "
                                f"hosts: ['127.0.0.1:{ports[0]}', 'localhost:{ports[1]}']}}\n"
                                "generator: {hosts: [1]}\ntrainer: {dp: 2, hosts: [0, 1]}\nreward: {hosts: [0]}\n")
    workers = Workers([("127.0.0.1", ports[0]), ("localhost", ports[1])])
    try:
        ranks = run_span(tmp_path, path)
        # Rank r runs under host r's worker, and the two joined one world across them.
        assert [(r["rank"], r["parent"]) for r in ranks] == [(0, workers.procs[0].pid), (1, workers.procs[1].pid)]
        assert [r["sum"] for r in ranks] == [3.0, 3.0]
        assert all(proc_gone(r["pid"]) for r in ranks), "procs still alive after the run"
        assert all(p.poll() is None for p in workers.procs), "the user's workers outlive the run"
    finally:
        workers.stop()


@pytest.mark.slow
def test_inside_a_slurm_allocation_it_attaches_to_the_workers_on_its_nodes(tmp_path, proc_gone):
    port = free_port()
    nodes = ["127.0.0.1", "127.0.0.2"]  # two "nodes" as scontrol would list them
    bin_dir = fake_command(tmp_path, "scontrol", 'test "$*" = "show hostnames node[1-2]" && echo 127.0.0.1 && echo 127.0.0.2')
    path = write_mesh(tmp_path, f"device: cpu\nhosts: 2\nprocs: 2\nlauncher: {{kind: slurm, port: {port}}}\n"
                                "generator: {hosts: [0]}\ntrainer: {dp: 2, hosts: [1]}\nreward: {hosts: [0]}\n")
    workers = Workers([(node, port) for node in nodes])
    try:
        env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[1-2]"}
        ranks = run_span(tmp_path, path, env)
        assert [(r["rank"], r["parent"]) for r in ranks] == [(0, workers.procs[1].pid), (1, workers.procs[1].pid)]  # host 1
        assert [r["sum"] for r in ranks] == [3.0, 3.0]
        assert all(proc_gone(r["pid"]) for r in ranks), "procs still alive after the run"
    finally:
        workers.stop()


def test_the_sbatch_example_matches_the_mesh_it_runs():
    script = Path(__file__).resolve().parents[2] / "examples" / "slurm" / "lockstep.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)  # parses
    text = script.read_text()
    cfg = load_mesh_config("h100x16")
    assert f"#SBATCH --nodes={cfg.hosts}\n" in text and f"#SBATCH --gpus-per-node={cfg.gpus}\n" in text
    assert f"PORT={cfg.launcher.worker_port} " in text and 'srun --ntasks-per-node=1 lockstep worker --port "${PORT}" &' in text
    assert 'python controller/main.py --mesh h100x16 "$@"' in text
