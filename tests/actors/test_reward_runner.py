"""RewardRunner without Monarch: functions and classes, weights, errors, time limits."""

import asyncio
import math
import os
import time

import pytest
import torch

from lockstep.actors.reward_runner import (
    RewardConfig,
    RewardError,
    RewardFunctionConfig,
    RewardRunner,
    Scores,
    merge_scores,
    merge_strided,
    pack,
    resolve,
)
from lockstep.actors.types import Sample


def sample(prompt="1+1=", completion="2", **fields):
    return Sample(prompt_index=0, prompt=prompt, completion=completion, prompt_ids=[1],
                  completion_ids=[2], logprobs=torch.zeros(1), policy_version=0,
                  fields=fields or {"answer": "2"})


def run(runner: RewardRunner, *batches) -> list[Scores]:
    """Score each batch in turn with one runner (as a reward proc does over steps), then close it."""
    async def main():
        try:
            return [await runner.score(b) for b in batches]
        finally:
            runner.close()

    return asyncio.run(main())


def score(functions, samples, **settings) -> list[float]:
    (scores,) = run(RewardRunner(functions, RewardConfig(**settings)), samples)
    assert scores.num_timeouts == 0
    return scores.values


def exact(prompt, completion, answer, **_):
    return float(completion == answer)


async def async_len(prompt, completion, **_):
    await asyncio.sleep(0)
    return len(completion)


# -- functions --


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
    assert "the step was not applied" in str(e.value) and "\n" not in str(e.value)


def test_bool_and_ints_count_as_numbers():
    assert score([(lambda p, c, **_: c == "2", 1.0), (lambda p, c, **_: 1, 1.0)], [sample()]) == [2.0]


def test_no_functions_or_a_bad_weight_is_a_clear_error():
    with pytest.raises(ValueError, match="set_reward"):
        RewardRunner([])
    with pytest.raises(ValueError, match="weight nan must be a finite number"):
        RewardRunner([(exact, math.nan)])


def test_merge_strided_inverts_rank_striding():
    items = list(range(7))
    per_rank = [items[r::3] for r in range(3)]
    assert merge_strided(per_rank) == items
    merged = merge_scores([Scores([0.0, 3.0], 1, ["a"]), Scores([1.0], 0, []), Scores([2.0], 2, ["b", "c"])])
    assert merged == Scores([0.0, 1.0, 2.0, 3.0], 3, ["a", "b", "c"])


# -- classes --


class Exact:
    """A batched reward: counts its constructions and remembers every batch it saw."""

    num_built = 0

    def __init__(self, scale: float = 1.0):
        Exact.num_built += 1
        self.scale = scale
        self.batches: list[tuple] = []

    def __call__(self, prompts, completions, answer, **fields):
        self.batches.append((list(prompts), list(completions), list(answer), fields))
        return [self.scale * (c == a) for c, a in zip(completions, answer)]


def test_class_is_built_once_and_scores_whole_batches():
    Exact.num_built = 0
    runner = RewardRunner([(Exact, 1.0, {"scale": 2.0})])
    assert Exact.num_built == 0  # checking (what the controller does) builds nothing
    steps = [[sample(completion=c, answer="2", id=i) for i, c in enumerate(batch)]
             for batch in (["2", "3", "2"], ["1"], ["2", "2"])]
    scores = run(runner, *steps)
    assert [s.values for s in scores] == [[2.0, 0.0, 2.0], [0.0], [2.0, 2.0]]
    assert Exact.num_built == 1
    (reward,) = runner.rewards
    # one call per batch, with every sample of it; dataset columns as lists
    assert reward.instance.batches == [
        (["1+1="] * 3, ["2", "3", "2"], ["2"] * 3, {"id": [0, 1, 2]}),
        (["1+1="], ["1"], ["2"], {"id": [0]}),
        (["1+1="] * 2, ["2", "2"], ["2"] * 2, {"id": [0, 1]}),
    ]


class AsyncLength:
    def __init__(self):
        self.calls = 0

    async def __call__(self, prompts, completions, **fields):
        self.calls += 1
        await asyncio.sleep(0)
        return [len(c) for c in completions]


def test_class_and_function_mix_with_weights():
    samples = [sample(completion=c) for c in ["2", "33", "2x"]]
    values = score([(Exact, 0.5, {"scale": 4.0}), (AsyncLength, -1.0), (exact, 10.0)], samples)
    assert values == [0.5 * 4 - 1 + 10, 0 - 2 + 0, 0 - 2 + 0]


def test_class_by_path_with_args_from_config(tmp_path):
    f = tmp_path / "my_rm.py"
    f.write_text(
        "class Offset:\n"
        "    def __init__(self, offset):\n"
        "        self.offset = offset\n"
        "    def __call__(self, prompts, completions, **fields):\n"
        "        return [self.offset + len(c) for c in completions]\n"
    )
    cfg = RewardConfig(functions=[RewardFunctionConfig(fn=f"{f}:Offset", weight=2.0, args={"offset": 0.5})])
    (scores,) = run(RewardRunner.from_config(cfg), [sample(completion="ab"), sample(completion="")])
    assert scores.values == [5.0, 1.0]


class NoCall:
    def __init__(self):
        pass


class Broken:
    def __init__(self, path):
        raise FileNotFoundError(f"no model at {path}")

    def __call__(self, prompts, completions, **fields):
        return [0.0] * len(prompts)


def test_bad_class_or_args_is_a_clear_line_before_anything_is_built():
    with pytest.raises(ValueError, match=r"reward class .*Exact: constructor arguments \{'nope': 1\} do not fit"):
        RewardRunner([(Exact, 1.0, {"nope": 1})])
    with pytest.raises(ValueError, match=r"reward class .*NoCall has no __call__"):
        RewardRunner([(NoCall, 1.0)])
    with pytest.raises(ValueError, match=r"reward function .*exact got args \{'x': 1\}; args are a reward class's"):
        RewardRunner([(exact, 1.0, {"x": 1})])
    with pytest.raises(ValueError, match=r"is an instance of a batched reward class; pass the class \(and its args\)"):
        RewardRunner([(Exact(), 1.0)])
    with pytest.raises(ValueError, match=r"give \(fn, weight\) or \(fn, weight, args\)"):
        RewardRunner([(exact,)])
    runner = RewardRunner([(Broken, 1.0, {"path": "/nowhere"})])
    with pytest.raises(RewardError, match=r"reward class .*Broken raised FileNotFoundError: no model at /nowhere "
                                          r"in its constructor \(args \{'path': '/nowhere'\}\)"):
        run(runner, [sample()])


@pytest.mark.parametrize(
    "returns, pattern",
    [
        ("[1.0]", r"returned 1 values for its batch of 3 samples \(samples 0, 1, 2\); __call__ must return one float per sample"),
        ("7.0", r"returned 7.0 \(float\) for its batch of 3 samples"),
        ("[0.0, float('nan'), 0.0]", r"returned nan \(float\) on sample 1 \(prompt '1\+1=', completion 'b'\)"),
        ("1 / 0", r"raised ZeroDivisionError: division by zero on its batch of 3 samples \(samples 0, 1, 2\)"),
    ],
)
def test_class_errors_name_the_class_and_the_samples(tmp_path, returns, pattern):
    f = tmp_path / "bad_rm.py"
    f.write_text(f"class Bad:\n    def __call__(self, prompts, completions, **fields):\n        return {returns}\n")
    with pytest.raises(RewardError, match=r"reward class .*Bad " + pattern) as e:
        score([(f"{f}:Bad", 1.0)], [sample(completion=c) for c in "abc"])
    assert "\n" not in str(e.value)


# -- time limits --


def sleepy(prompt, completion, pid_dir="", **_):
    """Sleeps 'forever' on completion 'slow', leaving its pid behind."""
    if completion == "slow":
        with open(os.path.join(pid_dir, "pid"), "w") as f:
            f.write(str(os.getpid()))
        time.sleep(600)
    return 1.0


def test_a_function_past_the_timeout_is_one_line_and_its_worker_is_killed(tmp_path, proc_gone):
    samples = [sample(completion=c, pid_dir=str(tmp_path)) for c in ["2", "slow", "2"]]
    start = time.monotonic()
    with pytest.raises(RewardError) as e:
        score([(sleepy, 1.0)], samples, timeout_s=1.0)
    assert time.monotonic() - start < 60  # no hang: the limit, plus worker start-up
    assert str(e.value) == (
        f"reward function {__name__}:sleepy on sample 1 (prompt '1+1=', completion 'slow') ran past "
        "reward.timeout_s=1 s; the step was not applied (raise reward.timeout_s, or set "
        "reward.on_timeout=default to score reward.default_score instead)"
    )
    assert proc_gone(int((tmp_path / "pid").read_text()))


def test_on_timeout_default_scores_the_default_counts_it_and_goes_on(tmp_path, proc_gone):
    runner = RewardRunner([(sleepy, 2.0), (exact, 1.0)],
                          RewardConfig(timeout_s=1.0, on_timeout="default", default_score=-1.0, workers=2))
    slow = [sample(completion=c, answer="2", pid_dir=str(tmp_path)) for c in ["2", "slow", "3"]]
    first, second = run(runner, slow, [sample(completion="2", answer="2", pid_dir=str(tmp_path))])
    assert first.values == [2.0 + 1.0, 2.0 * -1.0 + 0.0, 2.0 + 0.0]
    assert first.num_timeouts == 1
    assert first.timeouts == [f"reward function {__name__}:sleepy on sample 1 (prompt '1+1=', completion 'slow') "
                              "ran past reward.timeout_s=1 s; scored reward.default_score=-1"]
    assert proc_gone(int((tmp_path / "pid").read_text()))
    assert second == Scores([3.0], 0, [])  # a fresh worker took the killed one's place


async def async_sleepy(prompt, completion, **_):
    await asyncio.sleep(600 if completion == "slow" else 0)
    return 1.0


class SleepyModel:
    def __call__(self, prompts, completions, **fields):
        time.sleep(2 if "slow" in completions else 0)  # its thread outlives the limit
        return [1.0] * len(prompts)


def test_async_functions_and_class_batches_have_the_limit_too():
    samples = [sample(completion=c) for c in ["2", "slow"]]
    with pytest.raises(RewardError, match=r"reward function .*async_sleepy on sample 1 .* ran past reward.timeout_s=0.5 s"):
        score([(async_sleepy, 1.0)], samples, timeout_s=0.5)
    with pytest.raises(RewardError, match=r"reward class .*SleepyModel on its batch of 2 samples \(samples 0, 1\) "
                                          r"ran past reward.timeout_s=0.5 s; the step was not applied"):
        score([(SleepyModel, 1.0)], samples, timeout_s=0.5)
    (scores,) = run(RewardRunner([(SleepyModel, 1.0), (exact, 1.0)],
                                 RewardConfig(timeout_s=0.5, on_timeout="default", default_score=0.25)), samples)
    assert scores.values == [0.25 + 1.0, 0.25 + 0.0] and scores.num_timeouts == 2


def test_a_timeout_that_is_the_functions_own_error_is_reported_as_raised():
    async def own(prompt, completion, **_):
        raise TimeoutError("the judge's HTTP call")

    with pytest.raises(RewardError, match=r"own raised TimeoutError: the judge's HTTP call on sample 0"):
        score([(own, 1.0)], [sample()], timeout_s=5.0)


def busy(prompt, completion, log_dir="", **_):
    """CPU-bound (pure Python, holds the GIL) for ~0.2 s; records when it ran and where."""
    start = time.monotonic()
    x = 0
    while time.monotonic() - start < 0.2:
        x += 1
    with open(os.path.join(log_dir, f"{prompt}.txt"), "w") as f:
        f.write(f"{os.getpid()} {os.getppid()} {start} {time.monotonic()}")
    return 1.0


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    depth = best = 0
    for _, delta in events:
        depth += delta
        best = max(best, depth)
    return best


def test_sync_functions_run_side_by_side_in_the_workers(tmp_path):
    samples = [sample(prompt=f"p{i}", log_dir=str(tmp_path)) for i in range(8)]
    assert score([(busy, 1.0)], samples, workers=2) == [1.0] * 8
    records = [f.read_text().split() for f in tmp_path.iterdir()]
    assert len(records) == 8 and {int(r[1]) for r in records} == {os.getpid()}  # workers of this process
    assert len({r[0] for r in records}) == 2  # two worker processes
    assert max_overlap([(float(r[2]), float(r[3])) for r in records]) == 2  # side by side, never more


def test_config_checks_its_values():
    for kwargs, message in [
        ({"timeout_s": -1.0}, "reward.timeout_s=-1.0 must be >= 0 seconds"),
        ({"on_timeout": "skip"}, "reward.on_timeout='skip' is not one of error|default"),
        ({"default_score": math.inf}, "reward.default_score=inf must be finite"),
        ({"workers": 0}, "reward.workers=0 must be >= 1"),
    ]:
        with pytest.raises(ValueError, match=message.replace("|", r"\|")):
            RewardConfig(**kwargs)


def test_pack_keeps_args_and_makes_classes_portable():
    packed = pack([(Exact, 1.0, {"scale": 3.0}), ("lockstep.controller.rewards:arithmetic", 0.5)])
    assert isinstance(packed[0][0], bytes) and packed[0][1:] == (1.0, {"scale": 3.0})
    assert packed[1] == ("lockstep.controller.rewards:arithmetic", 0.5)
    assert score(packed, [sample(completion="2")]) == [3.0 + 0.5]


def test_a_reward_that_cannot_be_pickled_says_what_to_do():
    import threading

    lock = threading.Lock()
    with pytest.raises(ValueError, match=r"reward .*<lambda> cannot travel to the reward procs: pickling it failed "
                                         r"\(TypeError: cannot pickle '_thread.lock' object\)"):
        RewardRunner([(lambda p, c, **_: 1.0 if lock else 0.0, 1.0)])
    with pytest.raises(ValueError, match="cannot travel to the reward procs"):
        pack([(lambda p, c, **_: 1.0 if lock else 0.0, 1.0)])
