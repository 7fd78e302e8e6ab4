"""controller/main.py as users run it: a script path, in a fresh process."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "controller" / "main.py"


def run_main(*args, cwd, timeout=600):
    return subprocess.run([sys.executable, str(MAIN), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "args, message",
    [
        (["trainer.lrr=1"], "error: unknown config key trainer.lrr; valid keys under trainer:"),
        (["loop.barrier=maybe"], "error: loop.barrier='maybe' is not one of strict|measure|off"),
        (["--config", "nope.yaml"], "error: --config nope.yaml: no such file"),
        (["--mesh", "tpu-pod"], "error: unknown mesh config 'tpu-pod'; available:"),
        (["generator.top_p=0"], "error: generator.top_p=0"),
        (["--resume", "nowhere"], "error: --resume "),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, args, message):
    from lockstep.controller.main import main

    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [err.strip()]  # exactly one line
    assert err.startswith(message)


@pytest.mark.parametrize(
    "mesh, message",
    [
        ("h100x16", "error: mesh config 'h100x16': launcher slurm needs `sbatch`, not found here"),
        pytest.param(
            "h100x8", "error: mesh config 'h100x8' wants 8 GPUs but this machine has",
            marks=pytest.mark.skipif(torch.cuda.device_count() >= 8, reason="this machine has 8 GPUs"),
        ),
    ],
)
def test_a_mesh_this_machine_cannot_launch_is_one_line(tmp_path, monkeypatch, capsys, mesh, message):
    from lockstep.controller.main import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable))  # no SLURM here, even where there is
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert main(["--mesh", mesh, "--steps", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err]
    assert err.startswith(message)


@pytest.mark.parametrize(
    "rows, extra, message",
    [
        ("", [], "error: data.path='{path}' has no rows; write one JSON object per line, e.g. {{\"prompt\": \"3+4=\"}}"),
        ('{"prompt": "' + "1+1" * 100 + '="}\n', ["generator.max_model_len=64"],
         "error: all 1 prompts of data.source=jsonl ({path}) are longer than 61 tokens (the longest has 301), so none "
         "fits; raise generator.max_model_len or lower generator.max_tokens"),
    ],
)
def test_bad_data_is_one_line_before_any_proc_starts(tmp_path, capsys, rows, extra, message):
    from lockstep.controller.main import main

    path = tmp_path / "prompts.jsonl"
    path.write_text(rows)
    args = ["data.source=jsonl", f"data.path={path}", "reward.functions=lockstep.controller.rewards:arithmetic",
            f"loop.log_dir={tmp_path / 'run'}", *extra]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and err == message.format(path=path)


def test_script_path_runs_with_the_installed_package(tmp_path):
    result = run_main("trainer.lr=-1", cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: trainer.lr=-1.0: must be > 0"


def test_audit_of_a_run_without_a_halt_is_one_clear_line(tmp_path, capsys):
    from lockstep.controller.main import main

    (tmp_path / "config.json").write_text('{"config": {}, "mesh": "local-cpu"}')
    assert main(["audit", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: lockstep audit --run {tmp_path}: no failing sample at") and "\n" not in err


def test_dry_run_prints_the_placement_and_starts_nothing(tmp_path, monkeypatch, capsys):
    from lockstep.controller.main import main

    monkeypatch.chdir(tmp_path)
    assert main(["--mesh", "h100x16", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "mesh h100x16: 2 hosts x 8 GPUs = 16 GPUs, launcher slurm"
    assert "  host 0: generator 8 procs (GPUs 0-7), reward 4 procs (CPU)" in out
    assert "  host 1: trainer 8 procs (GPUs 0-7)" in out
    rows = [line.split() for line in out if line.startswith(("generator ", "trainer ", "reward "))]
    gpu_rows = {(role, host, gpu) for role, host, _, gpu, *_ in rows if gpu != "-"}
    assert gpu_rows == {("generator", "0", str(g)) for g in range(8)} | {("trainer", "1", str(g)) for g in range(8)}
    assert out[-1] == "dry run: nothing was started"
    assert not (tmp_path / "runs").exists()


def test_worker_refuses_a_bind_address_that_is_not_an_ip(capsys):
    from lockstep.controller.main import main

    assert main(["worker", "--bind", "eth0"]) == 2
    assert capsys.readouterr().err.strip() == "error: lockstep worker --bind eth0: not an IP address (e.g. 0.0.0.0)"


def test_console_entry_has_run_subcommand(capsys):
    from lockstep.controller.main import cli

    with pytest.raises(SystemExit) as e:
        cli(["run", "--help"])
    assert e.value.code == 0
    assert "--mesh" in capsys.readouterr().out


def test_a_tp_that_does_not_split_the_model_is_one_line(tmp_path, monkeypatch, capsys):
    from lockstep.controller.main import main

    monkeypatch.chdir(tmp_path)
    mesh = tmp_path / "tp4.yaml"  # the demo model has 2 query heads
    mesh.write_text("device: cpu\nhosts: 1\nprocs: 8\nlauncher: {kind: local}\ngenerator: {dp: 1, tp: 4}\n"
                    "trainer: {dp: 2, tp: 1}\nreward: {procs: 2}\n")
    assert main(["--mesh", str(mesh), "--steps", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("error: mesh config 'tp4': generator.tp=4 does not divide the model's num_heads=2; "
                   "use a tp that divides it")


@pytest.mark.slow
def test_demo_trains_under_the_strict_barrier(tmp_path, tb_scalars):
    """The embedded demo as users run it (no --mesh: local-cpu), on the real meshes (about 1-2
    min on 2 quiet cores): a progress line per step, the summary, TensorBoard events; no logprob
    differs in any bit on any step, and the mean reward climbs. The whole run is deterministic
    (seeded data, sampling and init; invariant kernels), so the reward check cannot flake; the
    slope and the first/last-3 means are two views of it."""
    num_steps = 12
    result = run_main("--steps", str(num_steps), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "lockstep: mesh local-cpu, logs in " in out
    assert all(f"step {step:4d} |" in out for step in range(1, num_steps + 1)), out[-3000:]
    assert f"lockstep: {num_steps} steps, mean reward" in out
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert any(p.name.startswith("events.out.tfevents") for p in run_dir.iterdir())
    scalars = tb_scalars(run_dir)
    assert scalars["barrier/num_differing_tokens"] == [0.0] * num_steps
    assert min(scalars["barrier/num_tokens"]) > 0
    rewards = torch.tensor(scalars["reward/mean"], dtype=torch.float64)
    assert len(rewards) == num_steps
    steps = torch.arange(num_steps, dtype=torch.float64)
    slope = ((steps - steps.mean()) * (rewards - rewards.mean())).sum() / ((steps - steps.mean()) ** 2).sum()
    assert slope > 0, rewards.tolist()
    assert rewards[-3:].mean() > rewards[:3].mean(), rewards.tolist()


def _start_main(tmp_path: Path, *args: str, env: dict | None = None):
    """controller/main.py in the background, its stdout and stderr to out.log."""
    out = open(tmp_path / "out.log", "w")
    proc = subprocess.Popen([sys.executable, str(MAIN), *args], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, **(env or {})})
    return proc, tmp_path / "out.log"


def _wait_for_line(proc, log: Path, prefix: str, contains: str = "", timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(line.startswith(prefix) and contains in line for line in log.read_text().splitlines()):
        assert proc.poll() is None, f"exited before {prefix!r}: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {prefix!r} within {timeout_s} s"
        time.sleep(1)


@pytest.mark.slow
def test_a_simulated_host_that_dies_restarts_the_run_then_is_one_line_and_leaves_nothing(
        tmp_path, proc_gone, descendants, tb_scalars):
    """local-2host from the command line: generator and reward on host 0, FSDP trainer on
    host 1, each host a Monarch worker process; the trained weights cross hosts after every
    step, under the strict barrier. Kill host 1's worker (the trainer's host) after the
    step-1 checkpoint: the run respawns its meshes on fresh simulated hosts and goes on bit for
    bit. Kill it again with no restart left: one error line naming the host, and no worker or
    proc outlives the run."""
    # Monarch notices a lost proc after this much silence (default 1 min); shorter for the test.
    env = {"HYPERACTOR_MESH_GET_PROC_STATE_MAX_IDLE": "5s"}
    proc, log = _start_main(tmp_path, "--mesh", "local-2host", "--steps", "20", "loop.save_every=1",
                            "loop.max_restarts=1", env=env)
    started = set()
    for checkpoint in ("step_000001", "step_000002"):  # the second one is written after the restart
        _wait_for_line(proc, log, "lockstep: saved", contains=checkpoint)
        now = descendants(proc.pid)
        started |= now
        (host1,) = [pid for pid in now if "hosts_1" in open(f"/proc/{pid}/cmdline").read()]  # its worker
        os.kill(host1, signal.SIGKILL)
    assert proc.wait(timeout=600) == 1, log.read_text()[-3000:]
    lines = log.read_text().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and not any("Traceback" in line for line in lines), lines[-20:]
    assert errors[0].startswith("error: host 1 of mesh 'local-2host' is gone: its worker at ipc://"), errors[0]
    assert "(trainer ran there)" in errors[0]
    assert any(line.startswith("lockstep: restarting the meshes from step_000001") for line in lines)
    (step1,) = [line for line in lines if line.startswith("step    1 |")]
    (step2,) = [line for line in lines if line.startswith("step    2 |")]  # after the restart
    assert "| diff_tok 0 |" in step1 and "| diff_tok 0 |" in step2, (step1, step2)
    (run_dir,) = (tmp_path / "runs").iterdir()
    scalars = tb_scalars(run_dir)
    assert scalars["barrier/num_differing_tokens"] == [0.0, 0.0] and min(scalars["barrier/num_tokens"]) > 0
    assert scalars["policy_version"] == [1.0, 2.0]
    assert len(started) >= 2 * 7, started  # 2 workers and the 5 procs under them, before and after the restart
    assert not any(line.startswith("lockstep: 20 steps") for line in lines)
    assert all(proc_gone(pid) for pid in started), "a worker or proc outlived the run"


@pytest.mark.slow
def test_tp2_generator_against_fsdp_trainer_differs_in_no_bit(tmp_path, tb_scalars):
    """local-cpu-tp2: one vLLM engine tensor-parallel over 2 procs (each holding half of
    every matrix) against an FSDP trainer over 2 procs, strict barrier: 0 differing tokens
    on every step; step 2 samples from the weights step 1 trained, synced across the layouts."""
    num_steps = 2
    result = run_main("--mesh", "local-cpu-tp2", "--steps", str(num_steps), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    scalars = tb_scalars(run_dir)
    assert scalars["barrier/num_differing_tokens"] == [0.0] * num_steps
    assert min(scalars["barrier/num_tokens"]) > 0
    assert scalars["policy_version"] == [1.0, 2.0]
