"""Session on the real local-cpu meshes: trainer, vLLM generator, reward procs."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

from lockstep.actors.reward import RewardError
from lockstep.controller.barrier import BarrierError
from lockstep.controller.loop import WeightMismatchError

MAIN = Path(__file__).resolve().parents[2] / "controller" / "main.py"


def _tiny(tmp_path, **extra):
    from lockstep import Session

    sections = dict(data={"prompts_per_step": 2}, generator={"num_samples": 2},
                    loop={"log_dir": str(tmp_path / "run"), "barrier": "strict", "save_every": 2})
    return Session(mesh="local-cpu", echo=False, **{**sections, **extra})


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
def test_session_steps_generates_swaps_reward_and_resumes(tmp_path):
    with _tiny(tmp_path) as s:
        m1, m2 = s.run(2)
        assert (tmp_path / "run" / "checkpoints" / "step_000002" / "lockstep.json").is_file()  # save_every
        assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_000002"
        # strict barrier passed: every generator logprob equals the trainer's bit for bit
        assert m1["barrier/num_differing_tokens"] == 0 and m2["barrier/num_tokens"] > 0
        assert (m1["policy_version"], m2["policy_version"], s.policy_version) == (1, 2, 2)
        assert m1["num_samples"] == 4

        samples = s.generate(["1+1=", "2+2="], n=3)
        assert len(samples) == 6 and {x.policy_version for x in samples} == {2}
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
        assert s.policy_version == 3 and len(s.metrics) == 3
        s.set_reward("lockstep.controller.rewards:arithmetic")

        path = s.save(str(tmp_path / "ckpt"))
        s.step()
        assert s.policy_version == 4
        s.load(path)
        assert (s.policy_version, s.num_steps_done) == (3, 3)
        assert s.step()["policy_version"] == 4  # generators were re-synced to the restored weights
    assert (tmp_path / "run" / "config.json").is_file()


@pytest.mark.slow
def test_weight_check_then_strict_halt_then_audit_in_the_session_and_from_the_command_line(tmp_path):
    """One generator weight nudged by one ulp. First the weight fingerprints refuse the step
    before any sampling, naming the weight, and the session re-syncs the generator. With the
    check off, the strict barrier halts before the optimizer, the session stays usable, and
    the audit names that module; the command line re-runs the saved sample on restarted
    meshes with the saved weights."""
    run_dir, weight = tmp_path / "run", "layers.1.ffn_norm.weight"
    # 16 samples: a one-ulp nudge flips the bits of only some tokens' logprobs
    with _tiny(tmp_path, data={"prompts_per_step": 4}, generator={"num_samples": 4}) as s:
        s.step()
        generator = s._handles.generators[0]
        sampled_before = s._run(generator.sampling_state())
        s._run(generator.perturb_weight(weight))
        with pytest.raises(WeightMismatchError, match=r"^step 2: generator\[0\] does not hold the trainer's weights v1: "
                                                      r"model.layers.1.post_attention_layernorm.weight differs \(checksum "
                                                      r".*\); the step was refused before sampling$"):
            s.step()
        assert s._run(generator.sampling_state()) == sampled_before  # nothing was sampled
        assert (s.policy_version, s.num_steps_done) == (1, 1)
        assert s.step()["time/verify"] >= 0  # re-synced: the next step passes the check
        assert s.policy_version == 2

        s.config.loop.check_weights = False  # let the nudged weights reach the barrier
        s._run(generator.perturb_weight(weight))
        with pytest.raises(BarrierError, match=r"^step 3: barrier \(strict\): sample \d+ token \d+") as e:
            s.step()
        assert "session.audit()" in str(e.value) and f"lockstep audit --run {run_dir}" in str(e.value)
        # nothing trained, nothing bumped
        assert (s.policy_version, s.num_steps_done, len(s.metrics)) == (2, 2, 2)
        assert s._run(s._handles.trainer.version()) == 2

        report = s.audit()
        assert (report.step, report.policy_version) == (3, 2)
        assert report.module == "layers.1.ffn_norm" and report.divergence.position == 0
        assert report.divergence.inputs_equal and report.generator_reproduced and report.trainer_reproduced

        s._run(generator.perturb_weight(weight, ulps=-1))
        assert s.audit(s.generate("2+2=")[0]).divergence is None
        assert s.step()["barrier/num_differing_tokens"] == 0  # usable again, at the next version
        assert s.policy_version == 3

    result = subprocess.run([sys.executable, str(MAIN), "audit", "--run", str(run_dir)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The trainer restarted on the saved v2 weights scores exactly as at the barrier; the nudge
    # lived only in the old generator's memory, so the restarted one no longer reproduces it.
    assert "lockstep audit: step 3" in result.stdout and "policy v2" in result.stdout
    assert "trainer alone:   same logprobs as at the barrier" in result.stdout
    assert "generator alone: DIFFERENT" in result.stdout and "no difference" in result.stdout
