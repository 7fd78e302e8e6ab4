"""Session on the real local-cpu meshes: trainer, vLLM generator, reward procs."""

import math

import pytest

from lockstep.actors.reward import RewardError


def _tiny(tmp_path, **extra):
    from lockstep import Session

    return Session(
        mesh="local-cpu", echo=False,
        data={"prompts_per_step": 2}, generator={"num_samples": 2},
        loop={"log_dir": str(tmp_path / "run"), "barrier": "strict", "save_every": 2}, **extra,
    )


def test_calls_before_start_say_so():
    from lockstep import Session

    s = Session(echo=False)
    for call in (s.step, lambda: s.generate("1+1="), lambda: s.set_reward(len), lambda: s.save("x")):
        with pytest.raises(RuntimeError, match="not started; call start"):
            call()
    s.stop()  # nothing to stop: fine


@pytest.mark.slow
def test_session_steps_generates_swaps_reward_and_resumes(tmp_path):
    with _tiny(tmp_path) as s:
        m1, m2 = s.run(2)
        assert (tmp_path / "run" / "checkpoints" / "step_000002" / "controller.json").is_file()  # save_every
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
