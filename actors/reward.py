"""Reward API: plain callables `fn(prompt: str, completion: str, **fields) -> float`.

A function is a Python object or a dotted path ("pkg.mod:fn", "pkg.mod.fn" or
"path/to/file.py:fn"); sync or async. Several are summed with weights. `RewardRunner`
holds the logic (testable without Monarch); `RewardActor` is its thin mesh wrapper:
rank r of the reward mesh scores samples[r::world] and the controller merges them back
with `merge_strided`. Python objects (lambdas, notebook or script functions) travel
as cloudpickle bytes pickled by value (`pack`), so they need not be importable there.
"""

import asyncio
import importlib
import importlib.util
import inspect
import math
import numbers
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import cloudpickle
from monarch.actor import Actor, current_rank, current_size, endpoint

from lockstep.actors.types import Sample


@dataclass(kw_only=True, slots=True)
class RewardFunctionConfig:
    fn: str  # "pkg.mod:callable", "pkg.mod.callable" or "path/to/file.py:callable"
    weight: float = 1.0

    def __post_init__(self):
        if not isinstance(self.fn, str) or not self.fn:
            raise ValueError("reward.functions[].fn must be a dotted path like 'pkg.mod:fn'")
        if not math.isfinite(self.weight):
            raise ValueError(f"reward function {self.fn}: weight {self.weight} must be finite")


@dataclass(kw_only=True, slots=True)
class RewardConfig:
    # Empty: the data source's own reward (e.g. exact answer for the arithmetic task).
    functions: list[RewardFunctionConfig] = field(default_factory=list)


class RewardError(RuntimeError):
    """A reward function failed or returned something that is not a finite number."""


RewardFn = Callable[..., Any]


def resolve(path: str) -> RewardFn:
    """'pkg.mod:fn', 'pkg.mod.fn' or 'file.py:fn' -> the callable."""
    if ":" in path:
        module_name, attr = path.rsplit(":", 1)
    elif "." in path:
        module_name, attr = path.rsplit(".", 1)
    else:
        raise ValueError(f"reward function {path!r}: write it as 'pkg.module:function'")
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise FileNotFoundError(f"no file {os.path.abspath(module_name)}")
            spec = importlib.util.spec_from_file_location(
                os.path.splitext(os.path.basename(module_name))[0], module_name
            )
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except Exception as e:
        raise ValueError(
            f"reward function {path!r}: cannot import {module_name!r} ({type(e).__name__}: {e}); "
            "check the path and that the module is importable"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward function {path!r}: {module_name!r} has no callable {attr!r}")
    return fn


def pack(functions: list[tuple[RewardFn | str, float]]) -> list[tuple[str | bytes, float]]:
    """Callables -> cloudpickle bytes by value (their module may not exist on the reward
    procs, e.g. a test file or a user's script); lockstep's own and dotted paths stay as is."""
    packed = []
    for fn, weight in functions:
        if callable(fn):
            module = sys.modules.get(getattr(fn, "__module__", "") or "")
            by_value = module is not None and not module.__name__.startswith(("lockstep.", "__main__"))
            if by_value:
                cloudpickle.register_pickle_by_value(module)
            try:
                fn = _PACKED + cloudpickle.dumps(fn)
            finally:
                if by_value:
                    cloudpickle.unregister_pickle_by_value(module)
        packed.append((fn, weight))
    return packed


_PACKED = b"lockstep-reward:"


def function_name(fn: RewardFn) -> str:
    module = getattr(fn, "__module__", None) or "?"
    return f"{module}:{getattr(fn, '__qualname__', repr(fn))}"


def _short(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


class RewardRunner:
    """Scores samples with a weighted sum of reward functions."""

    def __init__(self, functions: list[tuple[RewardFn | str, float]]):
        if not functions:
            raise ValueError("no reward function given; set reward.functions or use set_reward(fn)")
        self.functions: list[tuple[RewardFn, float, str]] = []
        for fn, weight in functions:
            if isinstance(fn, bytes) and fn.startswith(_PACKED):
                fn = cloudpickle.loads(fn[len(_PACKED):])
            name = fn if isinstance(fn, str) else function_name(fn)
            if isinstance(fn, str):
                fn = resolve(fn)
            elif not callable(fn):
                raise ValueError(f"reward function {fn!r} is not callable")
            self.functions.append((fn, float(weight), name))

    @classmethod
    def from_config(cls, cfg: RewardConfig) -> "RewardRunner":
        return cls([(f.fn, f.weight) for f in cfg.functions])

    async def _one(self, fn: RewardFn, name: str, sample: Sample, index: int) -> float:
        where = (
            f"sample {index} (prompt {_short(sample.prompt)}, completion {_short(sample.completion)})"
        )
        try:
            value = fn(sample.prompt, sample.completion, **sample.fields)
            if inspect.isawaitable(value):
                value = await value
        except Exception as e:
            raise RewardError(
                f"reward function {name} raised {type(e).__name__}: {e} on {where}; "
                "the step was not applied"
            ) from e
        if isinstance(value, numbers.Real) and math.isfinite(float(value)):
            return float(value)
        raise RewardError(
            f"reward function {name} returned {value!r} ({type(value).__name__}) on {where}; "
            "it must return a finite float; the step was not applied"
        )

    async def score(self, samples: list[Sample], indices: list[int] | None = None) -> list[float]:
        """Weighted reward per sample. `indices` name the samples in errors (default: position)."""
        indices = list(range(len(samples))) if indices is None else indices
        totals = [0.0] * len(samples)
        for fn, weight, name in self.functions:
            values = await asyncio.gather(
                *(self._one(fn, name, s, i) for s, i in zip(samples, indices))
            )
            totals = [t + weight * v for t, v in zip(totals, values)]
        return totals


def merge_strided(per_rank: list[list]) -> list:
    """Inverse of rank r taking samples[r::world]: interleave the per-rank lists back."""
    world = len(per_rank)
    merged: list = [None] * sum(len(p) for p in per_rank)
    for rank, values in enumerate(per_rank):
        merged[rank::world] = values
    return merged


class RewardActor(Actor):
    """Thin mesh wrapper over RewardRunner; every rank gets all samples and scores its stride."""

    def __init__(self, reward_cfg: RewardConfig):
        self.runner = RewardRunner.from_config(reward_cfg)

    @endpoint
    async def score(self, samples: list[Sample]) -> list[float]:
        rank = current_rank().rank
        world = math.prod(current_size().values())
        indices = list(range(rank, len(samples), world))
        return await self.runner.score(samples[rank::world], indices)

    @endpoint
    async def set_functions(self, functions: list[tuple[str | bytes, float]]) -> None:
        """`functions` as made by `pack`."""
        self.runner = RewardRunner(functions)
