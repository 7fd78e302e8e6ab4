"""Session on the real local-cpu meshes: trainer, vLLM generator, reward procs.

The slow tests share one started Session (each start is ~1 min on 2 cores), in file order:
each takes the session where the previous one left it (its step and policy version), so its
assertions count from there, and leaves it usable. The first one needs the reward the
session was built with, so it runs first."""

import json
import math
import os
import statistics
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from lockstep.actors.reward import RewardError
from lockstep.controller.barrier import BarrierError
from lockstep.controller.loop import WeightMismatchError
from lockstep.controller.rewards import arithmetic

MAIN = Path(__file__).resolve().parents[2] / "controller" / "main.py"


class LengthModel:
    """A batched reward class that logs its constructions and every batch it scores."""

    def __init__(self, log_dir: str, scale: float = 1.0):
        self.log_dir, self.scale = Path(log_dir), scale
        (self.log_dir / f"built-{os.getpid()}-{uuid.uuid4().hex}").touch()

    def __call__(self, prompts, completions, answer, **fields):
        scores = [self.scale * len(c) for c in completions]
        batch = {"pid": os.getpid(), "samples": list(zip(prompts, completions, answer)), "scores": scores}
        (self.log_dir / f"call-{uuid.uuid4().hex}.json").write_text(json.dumps(batch))
        return scores


def _take_calls(log_dir: Path) -> list[dict]:
    """The batches scored since the last look (their files are removed)."""
    calls = []
    for path in log_dir.glob("call-*.json"):
        calls.append(json.loads(path.read_text()))
        path.unlink()
    return calls


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """(started session, its log dir, the reward class's log dir): 2 prompts a step, strict
    barrier, a checkpoint every 2 steps; the reward is a class beside a function, weighted."""
    from lockstep import Session

    root = tmp_path_factory.mktemp("session")
    run_dir, logs = root / "run", root / "rewards"
    logs.mkdir()
    reward = {"functions": [
        {"fn": f"{__file__}:LengthModel", "weight": 0.5, "args": {"log_dir": str(logs), "scale": 2.0}},
        {"fn": "lockstep.controller.rewards:arithmetic", "weight": 3.0},
    ]}
    with Session(mesh="local-cpu", echo=False, reward=reward, data={"prompts_per_step": 2}, generator={"num_samples": 4},
                 loop={"log_dir": str(run_dir), "barrier": "strict", "save_every": 2}) as s:
        assert (run_dir / "config.json").is_file()
        yield s, run_dir, logs


def test_calls_before_start_say_so():
    from lockstep import Session

    s = Session(echo=False)
    for call in (s.step, lambda: s.generate("1+1="), lambda: s.set_reward(len), lambda: s.save("x"), s.audit):
        with pytest.raises(RuntimeError, match="not started; call start"):
            call()
    s.stop()  # nothing to stop: fine


def test_a_failure_while_stopping_never_hides_the_error(capsys, monkeypatch):
    from lockstep import Session
    from lockstep.controller.event_loop import LoopThread

    def broken_session():
        s = Session(echo=False)
        s._thread, s._meshes = LoopThread(), object()  # as if started

        async def teardown():
            raise RuntimeError("the procs did not stop within 120 s (loop.timeouts.stop)")

        monkeypatch.setattr(s, "_teardown", teardown)
        return s

    # leaving `with` on an error: the error goes on, the stop failure is one more line
    assert broken_session().__exit__(ValueError, ValueError("the original error"), None) is None
    assert capsys.readouterr().err == (
        "lockstep: also, stopping the meshes failed: the procs did not stop within 120 s (loop.timeouts.stop)\n")
    # a plain stop() reports it
    with pytest.raises(RuntimeError, match=r"^stopping the meshes failed: the procs did not stop"):
        broken_session().stop()


@pytest.mark.slow
def test_reward_class_and_function_weighted_over_steps(shared):
    s, _, logs = shared
    assert s.num_steps_done == 0  # first on the session: its rewards are the ones it was built with
    s.config.generator.num_samples = 4
    for _ in range(3):
        metrics = s.step()
        calls = _take_calls(logs)
        # each of the 2 reward procs scored its whole stride in one call: 4 + 4 of the 8 samples
        assert sorted(len(c["samples"]) for c in calls) == [4, 4] and len({c["pid"] for c in calls}) == 2
        samples = [x for c in calls for x in c["samples"]]
        expected = [0.5 * 2.0 * len(comp) + 3.0 * arithmetic(p, comp, a) for p, comp, a in samples]
        assert metrics["reward/mean"] == pytest.approx(statistics.fmean(expected), rel=1e-12)
        assert metrics["barrier/num_differing_tokens"] == 0 and metrics["reward/num_timeouts"] == 0
    assert len(list(logs.glob("built-*"))) == 2  # once per reward proc, over all 3 steps

    # set_reward with the class object and its args: built again, once on each proc
    s.set_reward(LengthModel, weight=1.0, args={"log_dir": str(logs), "scale": -1.0})
    metrics = s.step()
    assert len(list(logs.glob("built-*"))) == 4
    calls = _take_calls(logs)
    assert metrics["reward/mean"] == pytest.approx(statistics.fmean(x for c in calls for x in c["scores"]))
    s.set_reward("lockstep.controller.rewards:arithmetic")


@pytest.mark.slow
def test_session_steps_generates_swaps_reward_and_resumes(shared):
    s, run_dir, _ = shared
    s.config.generator.num_samples = 2
    v, n = s.policy_version, s.num_steps_done
    assert n % 2 == 0  # so that run(2) ends on a save_every step
    m1, m2 = s.run(2)
    last = f"step_{n + 2:06d}"
    assert (run_dir / "checkpoints" / last / "lockstep.json").is_file()  # save_every
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == last
    # strict barrier passed: every generator logprob equals the trainer's bit for bit
    assert m1["barrier/num_differing_tokens"] == 0 and m2["barrier/num_tokens"] > 0
    assert (m1["policy_version"], m2["policy_version"], s.policy_version) == (v + 1, v + 2, v + 2)
    assert m1["num_samples"] == 4

    samples = s.generate(["1+1=", "2+2="], n=3)
    assert len(samples) == 6 and {x.policy_version for x in samples} == {v + 2}
    assert [x.prompt_index for x in samples] == [0, 0, 0, 1, 1, 1]

    # a notebook-style closure reaches the reward procs and decides the rewards
    bonus = 0.25
    s.set_reward(lambda prompt, completion, **fields: bonus + len(completion))
    m3 = s.step()
    assert m3["reward/mean"] == pytest.approx(bonus + m3["completion/len_chars"])

    # a failing reward stops the step before training; the session stays usable
    s.set_reward(lambda prompt, completion, **fields: math.nan)
    with pytest.raises(RewardError, match="returned nan"):
        s.step()
    assert s.policy_version == v + 3 and len(s.metrics) == n + 3
    s.set_reward("lockstep.controller.rewards:arithmetic")

    path = s.save(str(run_dir.parent / "ckpt"))
    s.step()
    assert s.policy_version == v + 4
    s.load(path)
    assert (s.policy_version, s.num_steps_done) == (v + 3, n + 3)
    assert s.step()["policy_version"] == v + 4  # generators were re-synced to the restored weights


@pytest.mark.slow
def test_weight_check_then_strict_halt_then_audit_in_the_session_and_from_the_command_line(shared):
    """One generator weight nudged by one ulp. First the weight fingerprints refuse the step
    before any sampling, naming the weight, and the session re-syncs the generator. With the
    check off, the strict barrier halts before the optimizer, the session stays usable, and
    the audit names that module; the command line re-runs the saved sample on restarted
    meshes with the saved weights."""
    s, run_dir, _ = shared
    weight = "layers.1.ffn_norm.weight"
    # 16 samples: a one-ulp nudge flips the bits of only some tokens' logprobs
    s.config.generator.num_samples = 8
    s.step()
    v, n = s.policy_version, s.num_steps_done
    generator = s._handles.generators[0]
    sampled_before = s._run(generator.sampling_state())
    s._run(generator.perturb_weight(weight))
    with pytest.raises(WeightMismatchError, match=rf"^step {n + 1}: generator\[0\] does not hold the trainer's weights "
                                                  rf"v{v}: model.layers.1.post_attention_layernorm.weight differs "
                                                  r"\(checksum .*\); the step was refused before sampling$"):
        s.step()
    assert s._run(generator.sampling_state()) == sampled_before  # nothing was sampled
    assert (s.policy_version, s.num_steps_done) == (v, n)
    assert s.step()["time/verify"] >= 0  # re-synced: the next step passes the check
    assert s.policy_version == v + 1

    s.config.loop.check_weights = False  # let the nudged weights reach the barrier
    try:
        s._run(generator.perturb_weight(weight))
        with pytest.raises(BarrierError, match=rf"^step {n + 2}: barrier \(strict\): sample \d+ token \d+") as e:
            s.step()
        assert "session.audit()" in str(e.value) and f"lockstep audit --run {run_dir}" in str(e.value)
        # nothing trained, nothing bumped
        assert (s.policy_version, s.num_steps_done, len(s.metrics)) == (v + 1, n + 1, n + 1)
        assert s._run(s._handles.trainer.version()) == v + 1

        report = s.audit()
        assert (report.step, report.policy_version) == (n + 2, v + 1)
        assert report.module == "layers.1.ffn_norm" and report.divergence.position == 0
        assert report.divergence.inputs_equal and report.generator_reproduced and report.trainer_reproduced

        s._run(generator.perturb_weight(weight, ulps=-1))
        assert s.audit(s.generate("2+2=")[0]).divergence is None
        assert s.step()["barrier/num_differing_tokens"] == 0  # usable again, at the next version
        assert s.policy_version == v + 2
    finally:
        s.config.loop.check_weights = True

    result = subprocess.run([sys.executable, str(MAIN), "audit", "--run", str(run_dir)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The trainer restarted on the saved weights scores exactly as at the barrier; the nudge
    # lived only in the old generator's memory, so the restarted one no longer reproduces it.
    assert f"lockstep audit: step {n + 2}" in result.stdout and f"policy v{v + 1}" in result.stdout
    assert "trainer alone:   same logprobs as at the barrier" in result.stdout
    assert "generator alone: DIFFERENT" in result.stdout and "no difference" in result.stdout
