import asyncio

import pytest
import torch

from fake_actors import FakeGenerator, FakeReward, FakeTrainer
from lockstep.actors.reward import RewardConfig, RewardError, RewardRunner, RewardTimeoutWarning
from lockstep.controller.barrier import BarrierError
from lockstep.controller.loop import Handles, WeightMismatchError, run_step, split_evenly

PROMPTS = ["1+1=", "2+2=", "3+4=", "5+0=", "9+9="]
FIELDS = [{"answer": a} for a in ["2", "4", "7", "5", "18"]]


def make(num_generators=2, flip=None, reward=lambda p, c, **f: float(c == "1"), rewards=None, **settings):
    calls = []
    gens = [FakeGenerator(calls, f"gen{i}") for i in range(num_generators)]
    trainer = FakeTrainer(calls, flip=flip)
    runner = RewardRunner(rewards or [(reward, 1.0)], RewardConfig(workers=1, **settings))
    handles = Handles(generators=gens, trainer=trainer, reward=FakeReward(calls, runner))
    return calls, handles


def step(handles, version=0, barrier="measure", check_weights=False):
    return asyncio.run(run_step(handles, PROMPTS, FIELDS, version, barrier=barrier, temperature=1.0,
                                check_weights=check_weights, step=version + 1))


def test_split_evenly_covers_everything():
    assert split_evenly(5, 2) == [(0, 3), (3, 5)]
    assert split_evenly(2, 3) == [(0, 1), (1, 2), (2, 2)]


def test_phases_run_in_order_and_versions_advance():
    calls, handles = make()
    result = step(handles)
    roles = [(who, what) for who, what, _ in calls]
    assert roles == [
        ("gen0", "generate"), ("gen1", "generate"),
        ("reward", "score"), ("trainer", "forward_backward"), ("trainer", "optimizer_step"),
        ("trainer", "push_weights"), ("gen0", "update_weights"), ("gen1", "update_weights"),
    ]
    # 5 prompts over 2 replicas: 3 + 2, and every prompt gets its global index back
    assert [n for who, what, n in calls if what == "generate"] == [3, 2]
    assert sorted({s.prompt_index for s in result.samples}) == [0, 1, 2, 3, 4]
    assert all(PROMPTS[s.prompt_index] == s.prompt for s in result.samples)
    assert result.policy_version == 1
    assert all(g.weights_version == 1 for g in handles.generators)
    # the next step runs at version 1
    result2 = step(handles, version=1)
    assert result2.policy_version == 2


def test_advantages_are_group_normalized_and_metrics_present():
    _, handles = make()
    result = step(handles)
    batch = handles.trainer.batches[0]
    for s in batch.samples:  # sample "1" wins its group of 2, sample "0" loses
        assert s.reward == float(s.completion == "1")
        assert s.advantage == pytest.approx(1.0 if s.completion == "1" else -1.0, abs=1e-5)
    m = result.metrics
    assert m["reward/mean"] == 0.5 and m["barrier/num_differing_tokens"] == 0
    for phase in ("generate", "reward", "train", "sync", "step"):
        assert m[f"time/{phase}"] >= 0
    assert "time/score" not in m  # the barrier reads the training forward's logprobs
    assert m["train/loss"] == 0.5


def test_generator_at_wrong_version_refuses():
    calls, handles = make()
    handles.generators[1].weights_version = 3  # a replica missed a sync
    with pytest.raises(RuntimeError, match="policy version 3, asked for 0"):
        step(handles)
    assert not any(what in ("forward_backward", "optimizer_step") for _, what, _ in calls)


def test_stale_sample_version_is_caught_even_if_generator_does_not_check():
    calls, handles = make(num_generators=1)

    async def lying_generate(prompts, fields, expected_version, n=None, **kw):
        out = await FakeGenerator(calls, "liar", version=expected_version).generate(prompts, fields, expected_version, n)
        out[0].policy_version = expected_version - 1
        return out

    handles.generators[0].generate = lying_generate
    with pytest.raises(RuntimeError, match="out of sync"):
        step(handles, version=1)


def test_strict_barrier_halts_before_the_optimizer_step():
    calls, handles = make(flip=(3, 1))
    with pytest.raises(BarrierError) as e:
        step(handles, barrier="strict")
    assert "sample 3 token 1" in str(e.value)
    roles = [what for who, what, _ in calls if who == "trainer"]
    # one forward + backward, no separate scoring pass; its gradients are dropped, not applied
    assert roles == ["forward_backward", "drop_gradients"]
    assert handles.trainer.trained_version == 0 and handles.trainer.weights_version == 0
    assert e.value.failed.sample_index == 3 and e.value.failed.token_position == 1
    assert not any(what == "update_weights" for _, what, _ in calls)


def test_the_step_has_no_scoring_pass_under_any_barrier():
    for barrier in ("strict", "measure", "off"):
        calls, handles = make()
        step(handles, barrier=barrier)
        assert [what for who, what, _ in calls if who == "trainer"] == [
            "forward_backward", "optimizer_step", "push_weights"], barrier


def test_measure_counts_the_flipped_bit_and_trains():
    calls, handles = make(flip=(2, 0))
    result = step(handles, barrier="measure")
    assert result.metrics["barrier/num_differing_tokens"] == 1
    assert 0 < result.metrics["barrier/max_abs_diff"] < 1e-6
    assert any(what == "optimizer_step" for _, what, _ in calls)


def test_barrier_off_trains_despite_a_flipped_bit():
    calls, handles = make(flip=(0, 0))
    result = step(handles, barrier="off")
    assert "barrier/num_differing_tokens" not in result.metrics
    assert handles.trainer.trained_version == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "1.0", None, [1.0], {"score": 1}])
def test_bad_reward_stops_the_step_before_training(bad):
    def broken(prompt, completion, **fields):
        return bad if prompt == "5+0=" else 1.0

    calls, handles = make(reward=broken)
    with pytest.raises(RewardError, match=r"broken returned .* on sample \d+ \(prompt '5\+0='.*it must return a finite float") as e:
        step(handles)
    assert "\n" not in str(e.value)
    assert not any(who == "trainer" for who, _, _ in calls)


class LengthModel:
    """A batched reward class: scores a whole batch per call."""

    def __init__(self, scale):
        self.scale, self.batch_sizes = scale, []

    def __call__(self, prompts, completions, answer, **fields):
        self.batch_sizes.append(len(completions))
        return [self.scale * (len(c) + len(a)) for c, a in zip(completions, answer)]


def test_class_and_function_scores_reach_the_trainer_weighted():
    _, handles = make(rewards=[(LengthModel, 0.5, {"scale": 2.0}), (lambda p, c, **f: float(c == "1"), 3.0)])
    step(handles)
    (batch,) = handles.trainer.batches
    assert len(batch.samples) == 10
    for s in batch.samples:
        assert s.reward == 0.5 * 2.0 * (len(s.completion) + len(s.fields["answer"])) + 3.0 * (s.completion == "1")
    assert handles.reward.runner.rewards[0].instance.batch_sizes == [10]  # one call, the whole batch


def test_timeouts_scored_by_default_are_counted_and_warned():
    async def stuck_on_one(prompt, completion, **fields):
        await asyncio.sleep(600 if (prompt, completion) == ("5+0=", "1") else 0)
        return 1.0

    calls, handles = make(reward=stuck_on_one, timeout_s=0.2, on_timeout="default", default_score=-2.0)
    with pytest.warns(RewardTimeoutWarning, match=r"^step 1: 1 of 10 samples timed out: reward function "
                                                  r".*stuck_on_one on sample 7 \(prompt '5\+0=', completion '1'\) "
                                                  r"ran past reward.timeout_s=0.2 s; scored reward.default_score=-2$"):
        result = step(handles)
    assert result.metrics["reward/num_timeouts"] == 1
    assert sorted(s.reward for s in handles.trainer.batches[0].samples) == [-2.0] + [1.0] * 9
    assert any(what == "optimizer_step" for _, what, _ in calls)

    _, handles = make(reward=stuck_on_one, timeout_s=0.2)  # on_timeout=error (the default)
    with pytest.raises(RewardError, match=r"stuck_on_one on sample 7 .* ran past reward.timeout_s=0.2 s; the step was not applied"):
        step(handles)
    assert handles.trainer.batches == []


def test_weights_are_fingerprinted_before_sampling():
    calls, handles = make()
    result = step(handles, check_weights=True)
    assert [what for _, what, _ in calls[:3]] == ["fingerprint"] * 3  # trainer + 2 replicas, before generate
    assert result.metrics["time/verify"] >= 0
    step(handles, version=1, check_weights=True)  # after the sync, the new weights agree too


def test_a_generator_with_other_weights_refuses_the_step_before_sampling():
    calls, handles = make()
    step(handles)
    gen = handles.generators[1]
    gen.weights["model.norm.weight"][2] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))  # one ulp
    del calls[:]
    with pytest.raises(WeightMismatchError, match=r"^step 2: generator\[1\] does not hold the trainer's weights v1: "
                                                  r"model.norm.weight differs \(checksum .*\); the step was refused before sampling$"):
        step(handles, version=1, check_weights=True)
    assert {what for _, what, _ in calls} == {"fingerprint"}  # nothing sampled, scored or trained


def test_a_generator_at_another_version_is_named():
    calls, handles = make()
    step(handles)
    handles.generators[0].weights_version = 0  # a replica that missed the pull
    handles.generators[0].weights = None
    with pytest.raises(WeightMismatchError, match=r"generator\[0\] does not hold the trainer's weights v1: policy version v0 instead of v1"):
        step(handles, version=1, check_weights=True)
