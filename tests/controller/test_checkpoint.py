"""Checkpoint files: atomic writes, `latest`, pruning, and one clear line for each bad checkpoint.

The kill test writes real checkpoints with a single-process Trainer (no Monarch) through
`checkpoint.save`, the function Session.save uses.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from lockstep.controller import checkpoint
from lockstep.controller.checkpoint import CheckpointError
from lockstep.controller.config import ConfigError, load_config, to_dict
from lockstep.models.tiny import write_tiny_checkpoint


def _fake_checkpoint(path, step=2, config=None, model_dir=None):
    """The files of a complete checkpoint (contents only as deep as the checks read)."""
    os.makedirs(os.path.join(path, checkpoint.TRAINER_DIR), exist_ok=True)
    open(os.path.join(path, checkpoint.TRAINER_DIR, ".metadata"), "w").close()
    open(os.path.join(path, checkpoint.HF_WEIGHTS), "w").close()
    state = {"format": checkpoint.FORMAT, "step": step, "policy_version": step,
             "config": config or to_dict(load_config()), "mesh": "local-cpu", "generators": [{"num_calls": step}],
             "model": checkpoint.model_config(model_dir) if model_dir else {}}
    checkpoint.write_json(os.path.join(path, checkpoint.STATE_FILE), state)
    return str(path)


def test_atomic_write_latest_and_pruning(tmp_path):
    def fill_with(text):
        async def fill(staging):
            assert os.path.basename(staging).startswith(".step_")  # hidden until complete
            _fake_checkpoint(staging)
            with open(os.path.join(staging, "note"), "w") as f:
                f.write(text)
        return fill

    ckpts = tmp_path / "checkpoints"
    for step in range(1, 6):
        path = asyncio.run(checkpoint.write_atomically(str(ckpts / checkpoint.step_dir_name(step)), fill_with(f"s{step}")))
        checkpoint.set_latest(str(ckpts), path)
        checkpoint.prune(str(ckpts), keep=2)
    assert sorted(os.listdir(ckpts)) == ["latest", "step_000004", "step_000005"]
    assert checkpoint.latest(str(ckpts)) == str(ckpts / "step_000005")
    # a run dir, its checkpoints dir and a checkpoint all resolve
    assert checkpoint.resolve(str(tmp_path)) == checkpoint.resolve(str(ckpts)) == str(ckpts / "step_000005")
    assert checkpoint.resolve(str(ckpts / "step_000004")) == str(ckpts / "step_000004")

    # rewriting a checkpoint replaces it whole
    asyncio.run(checkpoint.write_atomically(str(ckpts / "step_000005"), fill_with("again")))
    assert (ckpts / "step_000005" / "note").read_text() == "again"
    assert sorted(os.listdir(ckpts)) == ["latest", "step_000004", "step_000005"]

    # a fill that fails leaves nothing behind
    async def broken(staging):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        asyncio.run(checkpoint.write_atomically(str(ckpts / "step_000006"), broken))
    assert sorted(os.listdir(ckpts)) == ["latest", "step_000004", "step_000005"]


def test_a_crash_between_the_two_renames_keeps_the_old_copy(tmp_path):
    """Replacing a checkpoint renames the old one aside first; if the process dies before the
    new one is renamed in, the old copy is what `latest` leads to."""
    ckpts = tmp_path / "checkpoints"
    path = _fake_checkpoint(ckpts / "step_000002")
    checkpoint.set_latest(str(ckpts), path)
    os.rename(path, ckpts / ".step_000002.old-1234abcd")
    assert checkpoint.resolve(str(tmp_path)) == str(ckpts / ".step_000002.old-1234abcd")
    assert checkpoint.read_state(checkpoint.latest(str(ckpts)))["step"] == 2


KILLED_SAVE = textwrap.dedent('''
    import asyncio, os, sys, time
    import torch
    from lockstep.actors.grpo import assign_advantages
    from lockstep.actors.trainer import Trainer, TrainerConfig
    from lockstep.actors.types import Sample, TrainBatch
    from lockstep.controller import checkpoint
    from lockstep.controller.loop import Handles
    from lockstep.models import ModelConfig

    model_dir, ckpts, marker, out = sys.argv[1:5]
    trainer = Trainer(ModelConfig(path=model_dir), TrainerConfig(lr=1e-2))
    samples = [Sample(prompt_index=i // 2, prompt="", completion="", prompt_ids=[5, 6 + i // 2], completion_ids=[7 + i, 8],
                      logprobs=torch.zeros(2), policy_version=0, reward=float(i % 2)) for i in range(4)]

    class AsyncTrainer:  # the endpoints the checkpoint calls, as the trainer actor offers them
        stall = False
        async def save(self, path): trainer.save(path)
        async def export_hf(self, path):
            trainer.export_hf(path)
            if self.stall:  # half written: DCP and weights are on disk, lockstep.json is not
                open(marker, "w").close()
                time.sleep(600)

    class Replica:
        async def sampling_state(self): return {"num_calls": 1}

    handles = Handles(generators=[Replica()], trainer=AsyncTrainer(), reward=None)

    def save(step):
        path = asyncio.run(checkpoint.save(os.path.join(ckpts, checkpoint.step_dir_name(step)), handles,
                                           {"step": step, "policy_version": trainer.version}, model_dir))
        checkpoint.set_latest(ckpts, path)

    def train():
        for s, lp in zip(samples, trainer.logprobs(samples, 1.0)):
            s.logprobs, s.policy_version = lp, trainer.version
        assign_advantages(samples)
        trainer.train_step(TrainBatch(samples=samples, temperature=1.0))

    train()
    save(1)
    torch.save(trainer.logprobs(samples, 1.0), out)
    train()
    handles.trainer.stall = True
    save(2)
''')


def test_killed_during_save_the_previous_checkpoint_still_loads(tmp_path):
    from lockstep.actors.trainer import Trainer, TrainerConfig
    from lockstep.models import ModelConfig

    model_dir = str(write_tiny_checkpoint(tmp_path / "tiny"))
    ckpts, marker, out = tmp_path / "checkpoints", tmp_path / "stalled", tmp_path / "logprobs.pt"
    script = tmp_path / "save.py"
    script.write_text(KILLED_SAVE)
    child = subprocess.Popen([sys.executable, str(script), model_dir, str(ckpts), str(marker), str(out)])
    try:
        deadline = time.monotonic() + 600
        while not marker.exists():
            assert child.poll() is None, f"the saving process exited early ({child.returncode})"
            assert time.monotonic() < deadline, "the second save never started"
            time.sleep(0.5)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()

    half = [e for e in os.listdir(ckpts) if e.startswith(".step_000002.tmp-")]
    assert len(half) == 1 and os.path.isdir(ckpts / half[0] / checkpoint.TRAINER_DIR)  # cut off mid-write
    assert not (ckpts / "step_000002").exists()
    path = checkpoint.resolve(str(ckpts))
    assert path == str(ckpts / "step_000001")
    assert checkpoint.read_state(path)["step"] == 1

    # the step-1 checkpoint loads whole: same scores as when it was saved
    resumed = Trainer(ModelConfig(path=model_dir), TrainerConfig(lr=1e-2))
    resumed.load(os.path.join(path, checkpoint.TRAINER_DIR))
    assert resumed.version == 1
    expected = torch.load(out)
    from lockstep.actors.types import Sample

    samples = [Sample(prompt_index=i // 2, prompt="", completion="", prompt_ids=[5, 6 + i // 2], completion_ids=[7 + i, 8],
                      logprobs=torch.zeros(2), policy_version=1) for i in range(4)]
    assert all(torch.equal(x, y) for x, y in zip(resumed.logprobs(samples, 1.0), expected))
    # its HF weights load too, and the next save's pruning clears the half-written dir
    from safetensors.torch import load_file

    weights = load_file(os.path.join(path, checkpoint.HF_WEIGHTS))
    assert all(torch.equal(weights[n], t) for n, t in resumed.scorer.hf_state_dict().items())
    checkpoint.prune(str(ckpts), keep=3)
    assert sorted(os.listdir(ckpts)) == ["latest", "step_000001"]


@pytest.mark.parametrize("missing", ["lockstep.json", "trainer/.metadata", "model.safetensors"])
def test_an_incomplete_checkpoint_is_one_line(tmp_path, missing):
    path = _fake_checkpoint(tmp_path / "step_000002")
    os.remove(os.path.join(path, missing))
    with pytest.raises(CheckpointError, match=rf"^checkpoint {path} is incomplete \(no {missing}\): ") as e:
        checkpoint.read_state(path)
    assert "\n" not in str(e.value)


def test_missing_and_empty_checkpoint_dirs_are_one_line(tmp_path):
    with pytest.raises(CheckpointError, match=rf"^checkpoint {tmp_path}/nope does not exist; pass a run's log dir"):
        checkpoint.resolve(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match=rf"^no checkpoint in {tmp_path} .*set loop.save_every"):
        checkpoint.resolve(str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_000009\n")
    with pytest.raises(CheckpointError, match=r"latest names 'step_000009', which is gone"):
        checkpoint.resolve(str(tmp_path))


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    small = write_tiny_checkpoint(tmp_path / "small")
    wide = write_tiny_checkpoint(tmp_path / "wide", hidden_size=128)
    path = _fake_checkpoint(tmp_path / "ckpt", model_dir=str(small))
    state = checkpoint.read_state(path)
    checkpoint.check_same_model(state, str(small), path)
    with pytest.raises(CheckpointError, match=rf"^checkpoint {path} is of another model \(hidden_size 64 vs 128, "
                                              r"checkpoint vs model.path\); load it with the model.path it was trained from$"):
        checkpoint.check_same_model(state, str(wide), path)


def test_config_changes_name_the_keys_that_matter():
    old = to_dict(load_config())
    new = to_dict(load_config(None, ["loop.steps=99", "loop.save_every=5", "loop.timeouts.reward=3"]))
    assert checkpoint.config_changes(old, new) == []
    new = to_dict(load_config(None, ["trainer.lr=0.1", "generator.temperature=0.7", "loop.steps=99"]))
    assert checkpoint.config_changes(old, new) == ["generator.temperature (1.0 -> 0.7)", "trainer.lr (0.005 -> 0.1)"]


# --- Session.resume / --resume: refused before any proc starts ----------------------------


def _run_dir(tmp_path, **config_overrides):
    """A run dir as a run leaves it: config.json and a step-2 checkpoint under checkpoints/."""
    cfg = load_config(None, [f"{k}={v}" for k, v in config_overrides.items()])
    cfg.loop.log_dir = str(tmp_path / "run")
    cfg.loop.resolve_dirs()
    os.makedirs(cfg.loop.log_dir)
    with open(tmp_path / "run" / "config.json", "w") as f:
        json.dump({"config": to_dict(cfg), "mesh": "local-cpu", "mesh_source": "local-cpu"}, f)
    path = _fake_checkpoint(tmp_path / "run" / "checkpoints" / "step_000002", config=to_dict(cfg))
    checkpoint.set_latest(str(tmp_path / "run" / "checkpoints"), path)
    return tmp_path / "run"


def test_resume_takes_the_runs_config_and_latest_checkpoint(tmp_path):
    from lockstep import Session

    run = _run_dir(tmp_path, **{"trainer.lr": 0.01})
    s = Session.resume(str(run), echo=False, loop={"steps": 10})
    assert s.config.trainer.lr == 0.01 and s.config.loop.steps == 10 and s.log_dir == str(run)
    assert s._resume_from == str(run / "checkpoints" / "step_000002")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--resume", "{run}", "trainer.lr=0.1", "generator.num_samples=3"],
         r"error: --resume {run}: the config differs from the run's in generator.num_samples \(16 -> 3\), "
         r"trainer.lr \(0.005 -> 0.1\); a resumed run keeps its config \(to start a new run from these weights "
         r"instead: model.path={run}/checkpoints/step_000002\)"),
        (["--resume", "{tmp}"], r"error: --resume {tmp}: no readable config.json; pass a run's log dir"),
        (["--resume", "{run}/checkpoints/step_000002"], r"error: --resume {run}/checkpoints/step_000002: no readable config.json"),
    ],
)
def test_bad_resume_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    from lockstep.controller.main import main

    run = _run_dir(tmp_path)
    fill = dict(run=str(run), tmp=str(tmp_path))
    assert main([a.format(**fill) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err]
    assert __import__("re").match(message.format(**fill), err), err


def test_resume_of_a_run_without_checkpoints_is_one_line(tmp_path, capsys):
    from lockstep.controller.main import main

    run = _run_dir(tmp_path)
    for entry in os.listdir(run / "checkpoints"):
        os.system(f"rm -rf {run / 'checkpoints' / entry}")
    assert main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: no checkpoint in {run} (no lockstep.json, no latest pointer): the run saved none " \
                  "(set loop.save_every) or this is not a run's log dir"


def test_resume_refuses_a_partial_latest_checkpoint(tmp_path):
    from lockstep import Session

    run = _run_dir(tmp_path)
    os.remove(run / "checkpoints" / "step_000002" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"is incomplete \(no model.safetensors\)"):
        Session.resume(str(run))
    with pytest.raises(ConfigError):
        Session.resume(str(_run_dir(tmp_path / "other")), trainer={"kl_coef": 0.5})
