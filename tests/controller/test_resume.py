"""Bitwise resume and recovery on the real local-cpu meshes (slow: three mesh starts).

One uninterrupted 4-step run (checkpoints at steps 2 and 4) is the reference. A run that
stopped after its step-2 checkpoint continues with `--resume`; a run whose generator proc is
killed during step 3 restarts its meshes from step 2. Both must end with a step-4 checkpoint
equal, tensor for tensor, to the reference's, and the resumed run's step 3 and 4 metrics must
be the reference's.
"""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lockstep.controller import checkpoint

MAIN = Path(__file__).resolve().parents[2] / "controller" / "main.py"
# The demo task, smaller: 2 prompts x 4 samples a step.
OVERRIDES = {"data": {"prompts_per_step": 2}, "generator": {"num_samples": 4},
             "loop": {"steps": 4, "save_every": 2, "keep_checkpoints": 0}}
TIMING = ("time/", "perf/")  # the only metrics that may differ between two runs


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: (live session after 4 steps, its log dir, its metrics)."""
    from lockstep import Session

    run_dir = tmp_path_factory.mktemp("reference") / "run"
    session = Session(mesh="local-cpu", echo=False, **{**OVERRIDES, "loop": {**OVERRIDES["loop"], "log_dir": str(run_dir)}})
    with session:
        session.run()
        assert session.num_steps_done == 4 and sorted(os.listdir(run_dir / "checkpoints")) == [
            "latest", "step_000002", "step_000004"]
        yield session, run_dir, [dict(m) for m in session.metrics]


def _tensors(path: Path) -> dict:
    """Every tensor of a checkpoint: the trainer's DCP state (weights, Adam moments, LR
    schedule, step, version, RNG) and the HF weights."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = path.parent / f"{path.name}.pt"
    dcp_to_torch_save(str(path / checkpoint.TRAINER_DIR), str(flat))
    state = torch.load(flat, weights_only=False)
    out = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}{i}.", v)
        else:
            out[prefix.rstrip(".")] = value

    walk("trainer.", state)
    out.update({f"hf.{k}": v for k, v in load_file(path / checkpoint.HF_WEIGHTS).items()})
    return out


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    assert any(k.startswith("trainer.optimizer.") for k in ta) and any(k.endswith("rng") for k in ta)
    for key, value in ta.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, tb[key]), key
        else:
            assert value == tb[key], key
    sa, sb = checkpoint.read_state(str(a)), checkpoint.read_state(str(b))
    for key in ("step", "policy_version", "data", "generators"):
        assert sa[key] == sb[key], key


def _without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith(TIMING)}


@pytest.mark.slow
def test_resume_continues_bit_for_bit(reference, tmp_path, tb_scalars):
    """The reference's log dir as a run that died after its step-2 checkpoint leaves it
    (no step-4 checkpoint, `latest` at step 2, no logs of later steps), then --resume."""
    _, ref_dir, ref_metrics = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir, ignore=shutil.ignore_patterns("step_000004", "events.out.tfevents*"))
    checkpoint.set_latest(str(run_dir / "checkpoints"), str(run_dir / "checkpoints" / "step_000002"))
    # a crashed run's config.json points at its own dirs
    text = (run_dir / "config.json").read_text().replace(str(ref_dir), str(run_dir))
    (run_dir / "config.json").write_text(text)

    result = subprocess.run([sys.executable, str(MAIN), "--resume", str(run_dir)],
                            capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert f"resumed {run_dir} from step_000002 (step 2)" in out
    assert "step    3 |" in out and "step    4 |" in out and "step    2 |" not in out

    _assert_same_checkpoint(ref_dir / "checkpoints" / "step_000004", run_dir / "checkpoints" / "step_000004")
    scalars = tb_scalars(run_dir)  # TensorBoard keeps float32
    for step in (3, 4):
        got = {tag: values[step - 3] for tag, values in scalars.items() if not tag.startswith(TIMING)}
        expected = {k: float(torch.tensor(v, dtype=torch.float32)) for k, v in _without_timing(ref_metrics[step - 1]).items()}
        assert got == expected, step


def _kill_generator_once(marker: str, controller: int):
    """The arithmetic reward, except that its first call anywhere SIGKILLs the generator proc
    (the child of the controller process that has vLLM loaded). It runs on the reward procs
    (or their worker processes)."""

    def reward(prompt, completion, **fields):
        import os
        import signal

        from lockstep.controller.rewards import arithmetic

        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return arithmetic(prompt, completion, **fields)
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                parent = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
                if parent == controller and "vllm" in open(f"/proc/{pid}/maps").read():
                    os.kill(int(pid), signal.SIGKILL)
            except OSError:
                continue
        return arithmetic(prompt, completion, **fields)

    return reward


@pytest.mark.slow
def test_a_killed_generator_restarts_from_the_last_checkpoint(reference, tmp_path, capsys):
    """Back at the reference's step 2 (its checkpoint, now this run's latest), the generator
    proc is killed during step 3 with loop.max_restarts=1: the run respawns the meshes,
    loads step 2 and finishes; its step-4 checkpoint is the reference's."""
    session, ref_dir, ref_metrics = reference
    session.config.loop.checkpoint_dir = str(tmp_path / "checkpoints")
    session.load(str(ref_dir / "checkpoints" / "step_000002"))
    session.save()  # this run's step-2 checkpoint: what it restarts from
    session.set_reward(_kill_generator_once(str(tmp_path / "killed"), os.getpid()))
    session.echo = True
    ran = session.run()

    assert (tmp_path / "killed").exists()
    err = capsys.readouterr().err
    assert "lockstep: generator[0] rank 0 failed during" in err and "Killed(sig=9)" in err
    assert "restarting the meshes from step_000002 (restart 1 of loop.max_restarts=1)" in err
    assert [m["step"] for m in ran] == [3, 4]
    assert [_without_timing(m) for m in ran] == [_without_timing(m) for m in ref_metrics[2:]]
    _assert_same_checkpoint(ref_dir / "checkpoints" / "step_000004", tmp_path / "checkpoints" / "step_000004")
