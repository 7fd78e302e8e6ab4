"""Rewards through a real Session on local-cpu: a reward class beside a function, over steps."""

import json
import os
import statistics
import uuid
from pathlib import Path

import pytest

from lockstep.controller.rewards import arithmetic


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


@pytest.mark.slow
def test_reward_class_and_function_weighted_over_steps(tmp_path):
    from lockstep import Session

    logs = tmp_path / "rewards"
    logs.mkdir()
    reward = {"functions": [
        {"fn": f"{__file__}:LengthModel", "weight": 0.5, "args": {"log_dir": str(logs), "scale": 2.0}},
        {"fn": "lockstep.controller.rewards:arithmetic", "weight": 3.0},
    ]}
    with Session(mesh="local-cpu", echo=False, reward=reward, data={"prompts_per_step": 2},
                 generator={"num_samples": 4}, loop={"log_dir": str(tmp_path / "run")}) as s:
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

