"""controller/main.py as users run it: a script path, in a fresh process."""

import subprocess
import sys
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
        (["generator.top_p=0.9"], "error: generator.top_p=0.9 samples from a truncated distribution"),
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
        ("h100x16", "error: mesh config 'h100x16': launcher 'slurm' is not supported yet"),
        pytest.param(
            "h100x8", "error: mesh config 'h100x8' wants 8 GPUs but this machine has",
            marks=pytest.mark.skipif(torch.cuda.device_count() >= 8, reason="this machine has 8 GPUs"),
        ),
    ],
)
def test_a_mesh_this_machine_cannot_launch_is_one_line(tmp_path, monkeypatch, capsys, mesh, message):
    from lockstep.controller.main import main

    monkeypatch.chdir(tmp_path)
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


def test_console_entry_has_run_subcommand(capsys):
    from lockstep.controller.main import cli

    with pytest.raises(SystemExit) as e:
        cli(["run", "--help"])
    assert e.value.code == 0
    assert "--mesh" in capsys.readouterr().out


@pytest.mark.slow
def test_two_steps_on_local_cpu(tmp_path):
    result = run_main("--mesh", "local-cpu", "--steps", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "step    1 |" in out and "step    2 |" in out
    assert "lockstep: 2 steps, mean reward" in out
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and any(p.name.startswith("events.out.tfevents") for p in runs[0].iterdir())


@pytest.mark.slow
def test_demo_trains_under_the_strict_barrier(tmp_path, tb_scalars):
    """The embedded demo, strict by default, on the real local-cpu meshes (about 1-2 min on
    2 quiet cores): no logprob differs in any bit on any step, and the mean reward climbs.
    The whole run is deterministic (seeded data, sampling and init; invariant kernels), so
    the reward check cannot flake; the slope and the first/last-3 means are two views of it."""
    num_steps = 12
    result = run_main("--steps", str(num_steps), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    scalars = tb_scalars(run_dir)
    assert scalars["barrier/num_differing_tokens"] == [0.0] * num_steps
    assert min(scalars["barrier/num_tokens"]) > 0
    rewards = torch.tensor(scalars["reward/mean"], dtype=torch.float64)
    assert len(rewards) == num_steps
    steps = torch.arange(num_steps, dtype=torch.float64)
    slope = ((steps - steps.mean()) * (rewards - rewards.mean())).sum() / ((steps - steps.mean()) ** 2).sum()
    assert slope > 0, rewards.tolist()
    assert rewards[-3:].mean() > rewards[:3].mean(), rewards.tolist()
