import asyncio
import math

import pytest
import torch

from lockstep.actors.reward import (
    RewardConfig,
    RewardError,
    RewardFunctionConfig,
    RewardRunner,
    merge_strided,
    pack,
    resolve,
)
from lockstep.actors.types import Sample


def sample(prompt="1+1=", completion="2", **fields):
    return Sample(prompt_index=0, prompt=prompt, completion=completion, prompt_ids=[1],
                  completion_ids=[2], logprobs=torch.zeros(1), policy_version=0,
                  fields=fields or {"answer": "2"})


def score(functions, samples):
    return asyncio.run(RewardRunner(functions).score(samples))


def exact(prompt, completion, answer, **_):
    return float(completion == answer)


async def async_len(prompt, completion, **_):
    await asyncio.sleep(0)
    return len(completion)


def test_weighted_sum_of_sync_and_async_functions():
    samples = [sample(completion="2"), sample(completion="33")]
    assert score([(exact, 2.0), (async_len, 0.5)], samples) == [2.5, 1.0]


def test_dotted_paths_resolve_in_all_three_forms(tmp_path):
    f = tmp_path / "my_reward.py"
    f.write_text("def shout(prompt, completion, **_):\n    return 3.0\n")
    assert resolve("lockstep.controller.rewards:arithmetic").__name__ == "arithmetic"
    assert resolve("lockstep.controller.rewards.gsm8k").__name__ == "gsm8k"
    assert score([(f"{f}:shout", 1.0)], [sample()]) == [3.0]
    with pytest.raises(ValueError, match="cannot import 'no.such'"):
        resolve("no.such:fn")
    with pytest.raises(ValueError, match="no callable 'nope'"):
        resolve("lockstep.controller.rewards:nope")


def boom(prompt, completion, **_):
    if completion == "bad":
        raise KeyError("answer")
    return 1.0


@pytest.mark.parametrize(
    "fn, pattern",
    [
        (boom, r"boom raised KeyError: 'answer' on sample 1 \(prompt '7\+1=', completion 'bad'\)"),
        (lambda p, c, **_: math.nan if c == "bad" else 0.0, r"<lambda> returned nan .* on sample 1"),
        (lambda p, c, **_: -math.inf if c == "bad" else 0.0, r"returned -inf .* on sample 1"),
        (lambda p, c, **_: "1" if c == "bad" else 0.0, r"returned '1' \(str\) on sample 1"),
        (lambda p, c, **_: None if c == "bad" else 0.0, r"returned None \(NoneType\) on sample 1"),
    ],
)
def test_errors_name_function_and_sample(fn, pattern):
    with pytest.raises(RewardError, match=pattern) as e:
        score([(fn, 1.0)], [sample(), sample(prompt="7+1=", completion="bad")])
    assert "the step was not applied" in str(e.value)


def test_bool_and_ints_count_as_numbers():
    assert score([(lambda p, c, **_: c == "2", 1.0), (lambda p, c, **_: 1, 1.0)], [sample()]) == [2.0]


def test_no_functions_is_a_clear_error():
    with pytest.raises(ValueError, match="set_reward"):
        RewardRunner([])


def test_merge_strided_inverts_rank_striding():
    items = list(range(7))
    per_rank = [items[r::3] for r in range(3)]
    assert merge_strided(per_rank) == items


def test_reward_mesh_scores_strided_and_reports_errors():
    """Two real reward procs: ranks score samples[r::2]; a notebook lambda travels by value."""
    from monarch.actor import ActorError, this_host

    from lockstep.actors.reward import RewardActor

    cfg = RewardConfig(functions=[RewardFunctionConfig(fn="lockstep.controller.rewards:arithmetic")])
    procs = this_host().spawn_procs(per_host={"procs": 2})
    try:
        mesh = procs.spawn("reward", RewardActor, cfg)
        samples = [sample(completion=c) for c in ["2", "3", "2x", "", "22"]]
        per_rank = [v for _, v in mesh.score.call(samples).get().items()]
        # answer "2": exact, off by one, "2" + junk, empty, off by 20
        assert per_rank == [[1.0, 0.5, 0.0], [pytest.approx(0.225), 0.0]]
        assert merge_strided(per_rank) == [1.0, pytest.approx(0.225), 0.5, 0.0, 0.0]

        bonus = 0.25
        mesh.set_functions.call(pack([(lambda p, c, **_: bonus + len(c), 1.0)])).get()
        assert merge_strided([v for _, v in mesh.score.call(samples).get().items()]) == [1.25, 1.25, 2.25, 0.25, 2.25]

        mesh.set_functions.call(pack([(boom, 1.0)])).get()  # boom's module is not importable there
        with pytest.raises(ActorError) as e:
            mesh.score.call([sample(), sample(prompt="7+1=", completion="bad")]).get()
        assert isinstance(e.value.exception, RewardError)
        assert "boom raised KeyError" in str(e.value.exception) and "sample 1" in str(e.value.exception)
    finally:
        procs.stop().get()
