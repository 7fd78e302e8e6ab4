"""Rewards: per-sample functions and batched classes, summed with weights, under time limits.

    def fn(prompt: str, completion: str, **fields) -> float            # sync or async
    class Cls:
        def __init__(self, **args): ...                                   # once per reward proc
        def __call__(self, prompts: list[str], completions: list[str], **fields: list) -> list[float]

Either is a Python object or a dotted path ("pkg.mod:name", "pkg.mod.name" or
"path/to/file.py:name"); `args` (config or `set_reward`) are the class's constructor
arguments. A class is built once by `RewardRunner.setup()` (load a model, open a sandbox)
and then scores a whole batch per call: dataset columns arrive as lists, one item per sample.
Sync functions run in worker processes (`reward_pool`), so CPU-bound checks run side by
side and a hung one can be killed; async functions and classes run in the reward proc.

`timeout_s` bounds each call: one sample of a function, one batch of a class. Past it, the
step stops with a RewardError naming the reward and the sample(s), or, with
`on_timeout=default`, those samples score `default_score` and are counted in `Scores`.
This module is plain Python (no Monarch, no torch) so the workers import it cheaply.
"""

import asyncio
import importlib
import importlib.util
import inspect
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import cloudpickle

from lockstep.actors.reward_pool import WorkerDied, WorkerPool, WorkerStartError, as_score, describe_value

ON_TIMEOUT = ("error", "default")
_MAX_TIMEOUT_LINES = 10  # per reward rank and step; Scores.num_timeouts has the full count


@dataclass(kw_only=True, slots=True)
class RewardFunctionConfig:
    fn: str  # a function or class: "pkg.mod:name", "pkg.mod.name" or "path/to/file.py:name"
    weight: float = 1.0
    args: dict = field(default_factory=dict)  # a reward class's constructor keyword arguments

    def __post_init__(self):
        if not isinstance(self.fn, str) or not self.fn:
            raise ValueError("reward.functions[].fn must be a dotted path like 'pkg.mod:fn'")
        if not math.isfinite(self.weight):
            raise ValueError(f"reward function {self.fn}: weight {self.weight} must be finite")


@dataclass(kw_only=True, slots=True)
class RewardConfig:
    # Empty: the data source's own reward (e.g. exact answer for the arithmetic task).
    functions: list[RewardFunctionConfig] = field(default_factory=list)
    # Seconds per call: one sample of a function, one batch of a class; 0 = no limit.
    timeout_s: float = 300.0
    # Past timeout_s: "error" stops the step; "default" scores default_score and warns (counted).
    on_timeout: str = "error"
    default_score: float = 0.0
    workers: int = 4  # processes per reward proc that run sync functions

    def __post_init__(self):
        if not (self.timeout_s >= 0 and math.isfinite(self.timeout_s)):
            raise ValueError(f"reward.timeout_s={self.timeout_s} must be >= 0 seconds (0: no limit)")
        if self.on_timeout not in ON_TIMEOUT:
            raise ValueError(f"reward.on_timeout={self.on_timeout!r} is not one of {'|'.join(ON_TIMEOUT)}")
        if not math.isfinite(self.default_score):
            raise ValueError(f"reward.default_score={self.default_score} must be finite")
        if self.workers < 1:
            raise ValueError(f"reward.workers={self.workers} must be >= 1")


class RewardError(RuntimeError):
    """A reward failed, timed out, or returned something that is not a finite number."""


class RewardTimeoutWarning(UserWarning):
    """Some samples scored reward.default_score because a reward timed out (on_timeout=default)."""


@dataclass
class Scores:
    """The weighted reward of each sample, and the calls that timed out (on_timeout=default)."""

    values: list[float]
    num_timeouts: int = 0  # samples that got default_score from at least one reward
    timeouts: list[str] = field(default_factory=list)  # one line per timed-out call


def merge_strided(per_rank: list[list]) -> list:
    """Inverse of rank r taking samples[r::world]: interleave the per-rank lists back."""
    world = len(per_rank)
    merged: list = [None] * sum(len(p) for p in per_rank)
    for rank, values in enumerate(per_rank):
        merged[rank::world] = values
    return merged


def merge_scores(per_rank: list[Scores]) -> Scores:
    """Scores of the reward ranks (rank r scored samples[r::world]) as one."""
    return Scores(
        values=merge_strided([s.values for s in per_rank]),
        num_timeouts=sum(s.num_timeouts for s in per_rank),
        timeouts=[line for s in per_rank for line in s.timeouts],
    )


# -- naming and moving rewards --

RewardFn = Callable[..., Any]
_PACKED = b"lockstep-reward:"


def resolve(path: str) -> RewardFn:
    """'pkg.mod:fn', 'pkg.mod.fn' or 'file.py:fn' -> the function or class."""
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


def pack_one(fn: RewardFn | str | bytes) -> str | bytes:
    """A function or class -> cloudpickle bytes by value (its module may not exist on the
    reward procs, e.g. a test file or a user's script); lockstep's own and paths stay as is."""
    if not callable(fn):
        return fn
    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    by_value = (module is not None and not module.__name__.startswith(("lockstep.", "__main__"))
                and module.__name__ not in cloudpickle.list_registry_pickle_by_value())  # else: leave it registered
    if by_value:
        cloudpickle.register_pickle_by_value(module)
    try:
        return _PACKED + cloudpickle.dumps(fn)
    except Exception as e:
        raise ValueError(
            f"reward {reward_name(fn)} cannot travel to the reward procs: pickling it failed "
            f"({type(e).__name__}: {e}); keep open files, locks and clients out of it (a class can open them in __init__)"
        ) from None
    finally:
        if by_value:
            cloudpickle.unregister_pickle_by_value(module)


def pack(functions: list[tuple]) -> list[tuple]:
    """[(fn or class or path, weight[, args])] -> the same with every object made portable."""
    return [(pack_one(item[0]), *item[1:]) for item in functions]


def load_packed(fn: RewardFn | str | bytes) -> RewardFn:
    """Inverse of pack_one, resolving paths: the callable itself."""
    if isinstance(fn, bytes) and fn.startswith(_PACKED):
        return cloudpickle.loads(fn[len(_PACKED):])
    if isinstance(fn, str):
        return resolve(fn)
    return fn


def reward_name(fn: RewardFn) -> str:
    module = getattr(fn, "__module__", None) or "?"
    return f"{module}:{getattr(fn, '__qualname__', repr(fn))}"


def _short(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _where(sample, index: int) -> str:
    return f"sample {index} (prompt {_short(sample.prompt)}, completion {_short(sample.completion)})"


def _is_reward_class(obj) -> bool:
    return inspect.isclass(obj)


def _parameters(fn) -> list[str]:
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # some builtins have no signature
        return []


def _is_async(fn) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


@dataclass
class _Reward:
    """One resolved reward with its weight (and, for a class, args and the built instance)."""

    obj: RewardFn
    weight: float
    name: str
    args: dict
    portable: Any  # as given; for sync functions, pack_one()ed: how a worker process loads it
    pool_index: int | None = None  # sync functions: which of the workers' functions it is
    instance: Any = None  # a class: built by setup()

    @property
    def kind(self) -> str:
        return "class" if _is_reward_class(self.obj) else "function"

    @property
    def label(self) -> str:
        return f"reward {self.kind} {self.name}"


def _check(obj: RewardFn, name: str, args: dict) -> None:
    """Everything that can be known before a reward class is built: path, callability, args."""
    if not callable(obj):
        raise ValueError(f"reward function {obj!r} is not callable")
    if not isinstance(args, dict):
        raise ValueError(f"reward {name}: args must be a mapping of constructor arguments, got {args!r}")
    if not _is_reward_class(obj):
        if {"prompts", "completions"} & set(_parameters(obj)):
            raise ValueError(
                f"reward {name} is an instance of a batched reward class; pass the class (and its args) "
                "so that it is built once on each reward proc"
            )
        if args:
            raise ValueError(
                f"reward function {name} got args {args}; args are a reward class's constructor "
                "arguments (bind a function's with functools.partial)"
            )
        return
    if not any("__call__" in vars(k) for k in obj.__mro__ if k is not object):
        raise ValueError(f"reward class {name} has no __call__(self, prompts, completions, **fields)")
    try:
        inspect.signature(obj).bind(**args)
    except TypeError as e:
        raise ValueError(f"reward class {name}: constructor arguments {args} do not fit: {e}") from None


class RewardRunner:
    """Scores samples with a weighted sum of rewards.

    Building one only resolves and checks the rewards (the controller does this to fail
    early); `setup()` builds the reward classes and starts the workers (the reward procs)."""

    def __init__(self, functions: list[tuple], settings: RewardConfig | None = None):
        """functions: [(fn, weight)] or [(fn, weight, args)]; fn a callable, class, path, or
        pack()ed. settings: timeouts and workers (its own `functions` are not used)."""
        if not functions:
            raise ValueError("no reward function given; set reward.functions or use set_reward(fn)")
        self.settings = settings or RewardConfig()
        self.rewards: list[_Reward] = []
        for item in functions:
            if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
                raise ValueError(f"reward {item!r}: give (fn, weight) or (fn, weight, args)")
            fn, weight, *rest = item
            args = rest[0] if rest else {}
            obj = load_packed(fn)
            name = fn if isinstance(fn, str) else reward_name(obj)
            if not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"reward {name}: weight {weight!r} must be a finite number")
            _check(obj, name, args or {})
            self.rewards.append(_Reward(obj, float(weight), name, dict(args or {}), fn))
        # Sync functions run in the workers; pool_index is their index in the workers' list.
        self._pooled = [r for r in self.rewards if r.kind == "function" and not _is_async(r.obj)]
        for i, r in enumerate(self._pooled):
            r.pool_index = i
            r.portable = pack_one(r.portable)
        self._pool: WorkerPool | None = None

    @classmethod
    def from_config(cls, cfg: RewardConfig) -> "RewardRunner":
        return cls([(f.fn, f.weight, f.args) for f in cfg.functions], cfg)

    def setup(self) -> None:
        """Build each reward class (once) and start the worker processes."""
        for r in self.rewards:
            if r.kind == "class" and r.instance is None:
                try:
                    r.instance = r.obj(**r.args)
                except Exception as e:
                    raise RewardError(
                        f"{r.label} raised {type(e).__name__}: {e} in its constructor "
                        f"(args {r.args}); fix it or set another reward"
                    ) from e
        if self._pooled and self._pool is None:
            self._pool = WorkerPool([r.portable for r in self._pooled], self.settings.workers)
            self._pool.start()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    @property
    def _timeout_s(self) -> float | None:
        return self.settings.timeout_s or None

    async def score(self, samples: list, indices: list[int] | None = None) -> Scores:
        """Weighted reward per sample. `indices` name the samples in errors (default: position)."""
        self.setup()  # no-op when the reward proc already did it
        indices = list(range(len(samples))) if indices is None else indices
        if not samples:
            return Scores(values=[])
        per_reward = await _all_or_cancel(
            [self._batch(r, samples, indices) if r.kind == "class" else self._samples(r, samples, indices)
             for r in self.rewards]
        )
        totals = [0.0] * len(samples)
        timed_out: set[int] = set()
        lines = []
        for r, (values, timeouts) in zip(self.rewards, per_reward):
            for i, value in enumerate(values):
                totals[i] += r.weight * (self.settings.default_score if value is None else value)
                if value is None:
                    timed_out.add(i)
            lines += timeouts
        return Scores(values=totals, num_timeouts=len(timed_out), timeouts=lines[:_MAX_TIMEOUT_LINES])

    def _timed_out(self, what: str) -> str:
        line = f"{what} ran past reward.timeout_s={self.settings.timeout_s:g} s"
        if self.settings.on_timeout == "error":
            raise RewardError(
                f"{line}; the step was not applied (raise reward.timeout_s, or set "
                "reward.on_timeout=default to score reward.default_score instead)"
            )
        return f"{line}; scored reward.default_score={self.settings.default_score:g}"

    async def _samples(self, r: _Reward, samples: list, indices: list[int]) -> tuple[list, list[str]]:
        """A function over each sample; None where it timed out."""
        values = await _all_or_cancel([self._one(r, s, i) for s, i in zip(samples, indices)])
        return [v for v, _ in values], [line for _, line in values if line]

    async def _one(self, r: _Reward, sample, index: int) -> tuple[float | None, str]:
        where = _where(sample, index)
        if r.pool_index is None:  # async: on this loop
            limit = asyncio.timeout(self._timeout_s)
            try:
                async with limit:
                    value = await r.obj(sample.prompt, sample.completion, **sample.fields)
            except TimeoutError as e:
                if not limit.expired():
                    raise self._raised(r, type(e).__name__, str(e), where) from e
                return None, self._timed_out(f"{r.label} on {where}")
            except Exception as e:
                raise self._raised(r, type(e).__name__, str(e), where) from e
            return self._value(r, value, where), ""
        try:
            reply = await self._pool.call(r.pool_index, sample.prompt, sample.completion, sample.fields, self._timeout_s)
        except TimeoutError:
            return None, self._timed_out(f"{r.label} on {where}")
        except WorkerDied as e:
            raise RewardError(f"{r.label} crashed its worker process ({e}) on {where}; the step was not applied") from None
        except WorkerStartError as e:
            raise RewardError(f"the reward worker processes could not load the sync functions: {e}") from None
        if reply[0] == "raised":
            raise self._raised(r, reply[1], reply[2], where)
        if reply[0] == "bad":
            raise self._bad(r, reply[1], where)
        return reply[1], ""

    async def _batch(self, r: _Reward, samples: list, indices: list[int]) -> tuple[list, list[str]]:
        """A class's call on the whole batch; all None if it timed out."""
        prompts = [s.prompt for s in samples]
        completions = [s.completion for s in samples]
        keys = dict.fromkeys(k for s in samples for k in s.fields)
        columns = {k: [s.fields.get(k) for s in samples] for k in keys}
        call = r.instance.__call__
        where = f"its batch of {len(samples)} samples ({_list_indices(indices)})"
        limit = asyncio.timeout(self._timeout_s)
        try:
            async with limit:
                if _is_async(call):
                    values = await call(prompts, completions, **columns)
                else:  # in a thread, so the limit can fire; it finishes on its own if it does
                    values = await asyncio.to_thread(call, prompts, completions, **columns)
        except TimeoutError as e:
            if not limit.expired():
                raise self._raised(r, type(e).__name__, str(e), where) from e
            return [None] * len(samples), [self._timed_out(f"{r.label} on {where}")]
        except Exception as e:
            raise self._raised(r, type(e).__name__, str(e), where) from e
        if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) != len(samples):
            got = f"{len(values)} values" if hasattr(values, "__len__") else describe_value(values)
            raise RewardError(
                f"{r.label} returned {got} for {where}; __call__ must return one float per sample"
            )
        return [self._value(r, v, _where(s, i)) for v, s, i in zip(values, samples, indices)], []

    def _value(self, r: _Reward, value, where: str) -> float:
        score = as_score(value)
        if score is None:
            raise self._bad(r, describe_value(value), where)
        return score

    @staticmethod
    def _raised(r: _Reward, type_name: str, message: str, where: str) -> RewardError:
        return RewardError(f"{r.label} raised {type_name}: {message} on {where}; the step was not applied")

    @staticmethod
    def _bad(r: _Reward, value: str, where: str) -> RewardError:
        return RewardError(
            f"{r.label} returned {value} on {where}; it must return a finite float; the step was not applied"
        )


def _list_indices(indices: list[int]) -> str:
    if len(indices) == 1:
        return f"sample {indices[0]}"
    if len(indices) <= 4:
        return "samples " + ", ".join(map(str, indices))
    return f"samples {indices[0]}, {indices[1]}, ..., {indices[-1]}"


async def _all_or_cancel(coros: list) -> list:
    """gather(), but the first error cancels the rest (their workers are killed) before it propagates."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
