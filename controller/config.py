"""RunConfig: each owner's dataclass, filled from YAML plus `section.key=value` overrides.

Unknown keys and wrong types fail at load time with one line naming the key and the fix.
The embedded default (no --config) is the built-in arithmetic task on a tiny model.
"""

import dataclasses
import datetime
import math
import os
import types
import typing
from dataclasses import dataclass, field

import yaml

from lockstep.actors.generator import GeneratorConfig
from lockstep.actors.reward import RewardConfig
from lockstep.actors.training import TrainerConfig
from lockstep.controller.barrier import POLICIES
from lockstep.controller.data import DataConfig
from lockstep.models import ModelConfig


class ConfigError(ValueError):
    """A config key is unknown or its value has the wrong type."""


@dataclass(kw_only=True, slots=True)
class TimeoutsConfig:
    """Seconds each phase's actor calls may take before the run stops with a line naming the
    role, rank and phase (0 = no limit). Generous: they catch hangs, not slowness."""

    start: float = 1800.0  # spawn the procs, build the models, start vLLM
    generate: float = 1800.0
    reward: float = 1800.0  # above reward.timeout_s: that one names the sample
    score: float = 900.0  # trainer logprobs outside a step (audits, ad hoc)
    train: float = 1800.0  # forward + backward (the barrier's logprobs), optimizer step
    sync: float = 900.0  # push + pull of the weights, and their fingerprints
    checkpoint: float = 1800.0  # save, load, HF export
    audit: float = 1800.0
    control: float = 300.0  # small calls: versions, sampling state, reward swaps
    stop: float = 120.0  # shutting the meshes down

    def __post_init__(self):
        for name in PHASES:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"loop.timeouts.{name}={value!r}: must be a number of seconds >= 0 (0 = no limit)")

    def seconds(self, phase: str) -> float | None:
        """The limit of `phase`, None for none."""
        return getattr(self, phase) or None


PHASES = tuple(f.name for f in dataclasses.fields(TimeoutsConfig))


@dataclass(kw_only=True, slots=True)
class LoopConfig:
    steps: int = 40  # the run's length; a resumed run does the steps left
    barrier: str = "strict"  # strict | measure | off (see controller/barrier.py)
    log_dir: str = ""  # empty: runs/<timestamp>
    checkpoint_dir: str = ""  # empty: <log_dir>/checkpoints
    save_every: int = 0  # steps between checkpoints; 0 = only when asked
    keep_checkpoints: int = 3  # newest checkpoints kept in checkpoint_dir; 0 = all
    max_restarts: int = 1  # respawns after a dead or hung actor (from the last checkpoint, if any)
    check_weights: bool = True  # fingerprint trainer and generator weights before each step
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)

    def __post_init__(self):
        if self.barrier not in POLICIES:
            raise ValueError(f"loop.barrier={self.barrier!r} is not one of {'|'.join(POLICIES)}")
        for name in ("steps", "save_every", "keep_checkpoints", "max_restarts"):
            if getattr(self, name) < 0:
                raise ValueError(f"loop.{name}={getattr(self, name)} must be >= 0")

    def resolve_dirs(self) -> None:
        """Fill the empty directories, as absolute paths (a resumed run may start elsewhere);
        called once per run, not at load (timestamps)."""
        if not self.log_dir:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
            self.log_dir = os.path.join("runs", stamp)
        self.log_dir = os.path.abspath(self.log_dir)
        self.checkpoint_dir = os.path.abspath(self.checkpoint_dir or os.path.join(self.log_dir, "checkpoints"))


@dataclass(kw_only=True, slots=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)

    def __post_init__(self):
        if self.model.impl == "stock" and self.loop.barrier == "strict":
            raise ValueError(
                "model.impl=stock does not give bitwise-equal logprobs, so loop.barrier=strict would halt "
                "the first step; set loop.barrier=measure (or off)"
            )


# What differs from the dataclass defaults in `make demo`: the arithmetic task on a tiny
# model, sized so that mean reward rises within minutes on 2 CPU cores.
DEFAULT_OVERRIDES: dict = {
    "data": {"source": "arithmetic", "max_operand": 4, "prompts_per_step": 8},  # 25 one-digit sums
    "generator": {"num_samples": 16, "max_tokens": 3},  # digit + EOS fits; big groups, clear advantages
    "trainer": {"lr": 5e-3, "micro_batch_size": 64},  # rises within ~30 steps, then settles
    "loop": {"steps": 40},
}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value, tp, key: str):
    """Check/convert `value` to the annotated type `tp`; strings from the CLI are parsed."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"config key {key}={value!r} must be one of {'|'.join(map(str, args))}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str):  # a list item given as a bare string fills the first field
            value = {dataclasses.fields(tp)[0].name: value}
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key} must be a mapping of {tp.__name__} fields, got {value!r}")
        return build(tp, value, key)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key} must be a list, got {value!r}")
        item_tp = args[0] if args else typing.Any
        items = [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key} must be a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key {key}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key}={value!r}: expected an integer, e.g. {key}=4")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 3e-4 as a string
            except ValueError:
                pass
        raise ConfigError(f"config key {key}={value!r}: expected a number, e.g. {key}=0.5")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key {key}={value!r}: expected a string")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"config key {key}={value!r}: expected {_type_name(tp)}")


def build(cls, data: dict, prefix: str):
    """Dataclass `cls` from a plain mapping; `prefix` is the dotted path used in errors."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key {dotted}; valid keys under {prefix or 'the top level'}: "
                              f"{', '.join(names)}")
        kwargs[key] = _convert(value, hints[key], dotted)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        text = str(e)
        raise ConfigError(text if not prefix or prefix.split(".")[0] in text else f"{prefix}: {text}") from None


def _set_dotted(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key {dotted}: {part} is a value, not a section")
        node = child
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> dict:
    """['trainer.lr=3e-4', 'loop.barrier=strict'] -> nested dict of strings (typed in build)."""
    tree: dict = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or "." not in key:
            raise ConfigError(f"override {item!r}: write it as section.key=value, e.g. trainer.lr=3e-4")
        _set_dotted(tree, key.strip(), value.strip())
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    path: str | None = None, overrides: list[str] | dict | None = None
) -> RunConfig:
    """YAML file (or the embedded default when None) + overrides -> RunConfig."""
    if path is None:
        tree = _merge({}, DEFAULT_OVERRIDES)
    else:
        if not os.path.isfile(path):
            raise ConfigError(f"--config {path}: no such file")
        with open(path) as f:
            tree = yaml.safe_load(f) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"--config {path}: the top level must be a mapping of sections")
    if overrides:
        extra = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        tree = _merge(tree, extra)
    return build(RunConfig, tree, "")


def to_dict(cfg) -> dict:
    """RunConfig -> plain dict (for logging and checkpoints)."""
    return dataclasses.asdict(cfg)
