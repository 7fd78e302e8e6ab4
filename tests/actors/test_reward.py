"""RewardActor on real Monarch reward procs: strides, classes built once per proc, workers, GPUs."""

import asyncio
import os
import time
import uuid
from pathlib import Path

import pytest
import torch
from monarch.actor import ActorError, default_bootstrap_cmd, this_host
from monarch.spmd import setup_torch_elastic_env_async

from lockstep.actors.reward import (
    RewardActor,
    RewardConfig,
    RewardError,
    RewardFunctionConfig,
    merge_scores,
    own_gpus,
    pack,
)
from lockstep.actors.types import Sample


def sample(prompt="1+1=", completion="2", **fields):
    return Sample(prompt_index=0, prompt=prompt, completion=completion, prompt_ids=[1],
                  completion_ids=[2], logprobs=torch.zeros(1), policy_version=0,
                  fields=fields or {"answer": "2"})


def spawn(cfg: RewardConfig, num_procs: int = 2, env: dict | None = None):
    procs = this_host().spawn_procs(per_host={"procs": num_procs},
                                    bootstrap_command=default_bootstrap_cmd().with_env(env or {}))
    asyncio.run(setup_torch_elastic_env_async(procs))  # LOCAL_RANK etc., as controller/meshes.py does
    return procs, procs.spawn("reward", RewardActor, cfg)


def score(mesh, samples):
    return merge_scores([v for _, v in sorted(mesh.score.call(samples).get().items(), key=lambda kv: kv[0].rank)])


def boom(prompt, completion, **_):
    if completion == "bad":
        raise KeyError("answer")
    return 1.0


def test_reward_mesh_scores_strided_and_reports_errors():
    """Two real reward procs: ranks score samples[r::2]; a notebook lambda travels by value."""
    cfg = RewardConfig(functions=[RewardFunctionConfig(fn="lockstep.controller.rewards:arithmetic")], workers=1)
    procs, mesh = spawn(cfg)
    try:
        samples = [sample(completion=c) for c in ["2", "3", "2x", "", "22"]]
        per_rank = [v.values for _, v in mesh.score.call(samples).get().items()]
        # answer "2": exact, off by one, "2" + junk, empty, off by 20
        assert per_rank == [[1.0, 0.5, 0.0], [pytest.approx(0.225), 0.0]]
        assert score(mesh, samples).values == [1.0, pytest.approx(0.225), 0.5, 0.0, 0.0]

        bonus = 0.25
        mesh.set_functions.call(pack([(lambda p, c, **_: bonus + len(c), 1.0)])).get()
        assert score(mesh, samples).values == [1.25, 1.25, 2.25, 0.25, 2.25]

        mesh.set_functions.call(pack([(boom, 1.0)])).get()  # boom's module is not importable there
        with pytest.raises(ActorError) as e:
            mesh.score.call([sample(), sample(prompt="7+1=", completion="bad")]).get()
        assert isinstance(e.value.exception, RewardError)
        assert "boom raised KeyError" in str(e.value.exception) and "sample 1" in str(e.value.exception)

        # a reward class whose constructor raises: score says so, and it can be replaced
        mesh.set_functions.call(pack([(BrokenModel, 1.0, {"path": "/nowhere"})])).get()
        with pytest.raises(ActorError) as e:
            mesh.score.call([sample()]).get()
        assert isinstance(e.value.exception, RewardError)
        assert "BrokenModel raised FileNotFoundError: no reward model at /nowhere in its constructor" in str(e.value.exception)
        mesh.set_functions.call(pack([(lambda p, c, **_: 3.0, 1.0)])).get()
        assert score(mesh, samples[:1]).values == [3.0]
    finally:
        procs.stop().get()


class BrokenModel:
    def __init__(self, path):
        raise FileNotFoundError(f"no reward model at {path}")

    def __call__(self, prompts, completions, **fields):
        return [0.0] * len(prompts)


class CountingModel:
    """A batched reward that leaves a file per construction and per call in `log_dir`."""

    def __init__(self, log_dir: str, bonus: float = 0.0):
        self.log_dir, self.bonus, self.num_calls = Path(log_dir), bonus, 0
        (self.log_dir / f"built-{os.getpid()}-{uuid.uuid4().hex}").write_text(os.environ.get("CUDA_VISIBLE_DEVICES", "-"))

    def __call__(self, prompts, completions, **fields):
        self.num_calls += 1
        (self.log_dir / f"call-{os.getpid()}-{self.num_calls}").write_text("\n".join(fields["id"]))
        return [self.bonus + len(c) for c in completions]


def test_a_class_is_built_once_per_proc_and_scores_its_whole_stride(tmp_path):
    """Built once on each of 2 procs over 3 steps, each call with its rank's whole stride. The
    procs start with the reward role's GPUs of a GPU mesh (meshes.proc_env): each proc's
    model sees only its own before it is built, so "cuda" is its own GPU."""
    cfg = RewardConfig(functions=[
        RewardFunctionConfig(fn=f"{__file__}:CountingModel", weight=2.0, args={"log_dir": str(tmp_path), "bonus": 1.0}),
        RewardFunctionConfig(fn="lockstep.controller.rewards:arithmetic", weight=10.0),
    ], workers=1)
    procs, mesh = spawn(cfg, env={"CUDA_VISIBLE_DEVICES": "2,3"})
    try:
        for step in range(3):
            samples = [sample(completion=c, answer="2", id=f"{step}.{i}") for i, c in enumerate(["2", "33", "2", "x", "2"])]
            assert score(mesh, samples).values == [2 * (1 + len(s.completion)) + 10 * (s.completion == "2") for s in samples]
        built = sorted(p.name.split("-")[1] for p in tmp_path.glob("built-*"))
        assert len(built) == 2 and len(set(built)) == 2  # one per reward proc, over 3 steps
        assert sorted(p.read_text() for p in tmp_path.glob("built-*")) == ["2", "3"]
        calls = {p.name: p.read_text().split("\n") for p in tmp_path.glob("call-*")}
        assert sorted(calls) == sorted(f"call-{pid}-{n}" for pid in built for n in (1, 2, 3))
        # each call saw its rank's whole stride of the step: 3 + 2 of the 5 samples
        for step in range(3):
            seen = sorted(i for name, ids in calls.items() if name.endswith(f"-{step + 1}") for i in ids)
            assert seen == [f"{step}.{i}" for i in range(5)]
            assert sorted(len(ids) for name, ids in calls.items() if name.endswith(f"-{step + 1}")) == [2, 3]
    finally:
        procs.stop().get()


def busy(prompt, completion, log_dir="", **_):
    """CPU-bound (pure Python, holds the GIL) for ~0.1 s; records when it ran and where."""
    start = time.monotonic()
    x = 0
    while time.monotonic() - start < 0.1:
        x += 1
    Path(log_dir, prompt).write_text(f"{os.getpid()} {os.getppid()} {start} {time.monotonic()}")
    return 1.0


def overlaps(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    depth = best = 0
    for _, delta in events:
        depth += delta
        best = max(best, depth)
    return best


def test_a_cpu_bound_reward_runs_concurrently_on_two_reward_procs(tmp_path):
    """64 samples, 2 reward procs with 2 workers each: recorded start/end times overlap
    within each proc (its workers) and across the procs."""
    (tmp_path / "warm-up").mkdir()
    (tmp_path / "timed").mkdir()
    procs, mesh = spawn(RewardConfig(functions=[RewardFunctionConfig(fn="lockstep.controller.rewards:arithmetic")], workers=2))
    try:
        mesh.set_functions.call(pack([(busy, 1.0)])).get()  # by value: the workers need not import this file
        score(mesh, [sample(prompt="warm-up", log_dir=str(tmp_path / "warm-up"))] * 8)  # every worker started
        samples = [sample(prompt=f"{i}+0=", log_dir=str(tmp_path / "timed")) for i in range(64)]
        assert score(mesh, samples).values == [1.0] * 64
    finally:
        procs.stop().get()
    records = [p.read_text().split() for p in (tmp_path / "timed").iterdir()]
    assert len(records) == 64
    by_proc: dict[str, list] = {}
    for worker, proc, start, end in records:
        by_proc.setdefault(proc, []).append((worker, float(start), float(end)))
    assert len(by_proc) == 2  # both reward procs scored
    for runs in by_proc.values():
        assert len({w for w, _, _ in runs}) == 2  # each through 2 worker processes
        assert overlaps([(s, e) for _, s, e in runs]) == 2  # side by side, never more than the pool
    (a, b) = by_proc.values()
    assert overlaps([(s, e) for _, s, e in a] + [(s, e) for _, s, e in b]) > 2  # and the procs with each other


def test_own_gpus_splits_the_roles_gpus_over_its_procs():
    assert own_gpus("4,5,6,7", 0, 2) == "4,5" and own_gpus("4,5,6,7", 1, 2) == "6,7"
    assert own_gpus("3", 0, 1) == "3" and own_gpus("", 1, 2) == ""
    with pytest.raises(ValueError, match="3 reward GPUs do not split over 2 reward procs"):
        own_gpus("0,1,2", 0, 2)
