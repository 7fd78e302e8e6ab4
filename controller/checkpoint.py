"""Checkpoints: what a run needs to continue bit for bit, written so that a crash at any
moment leaves the previous checkpoint whole.

    <checkpoint_dir>/
      step_000004/
        model.safetensors, config.json,    the weights as a HF checkpoint: it loads as is in
        tokenizer.json, ...                transformers and vLLM (and as model.path)
        trainer/                           DCP: weights, optimizer, LR schedule, step, version, RNG
        lockstep.json                      step, policy version, data position, each generator
                                           replica's sampling state, config, mesh, model config
      latest                               "step_000004": the newest complete checkpoint

A checkpoint is written into a hidden staging dir, fsynced, renamed into place, and only
then does `latest` move (itself replaced atomically). Older ones are pruned to
`loop.keep_checkpoints`; staging dirs left by a killed save are ignored, then removed.
"""

import asyncio
import json
import os
import re
import shutil
import uuid

FORMAT = 1
STATE_FILE = "lockstep.json"
TRAINER_DIR = "trainer"
HF_WEIGHTS = "model.safetensors"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json")
# Config keys a resumed run may change: they decide how long and how safely it runs, not
# what it computes.
RESUME_MAY_CHANGE = (
    "loop.steps", "loop.log_dir", "loop.checkpoint_dir", "loop.save_every", "loop.keep_checkpoints",
    "loop.max_restarts", "loop.timeouts.", "loop.check_weights", "generator.gpu_memory_utilization", "reward.workers",
)
# config.json keys that do not make another model.
_MODEL_KEYS_IGNORED = ("_name_or_path", "transformers_version", "architectures", "torch_dtype")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, of another model, or does not fit the run."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


# --- writing -----------------------------------------------------------------------------


async def write_atomically(path: str, fill) -> str:
    """`await fill(staging_dir)` writes the checkpoint's files; they appear at `path` all at
    once (a checkpoint already there is replaced: renamed aside, then removed)."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    staging, aside = os.path.join(parent, f".{name}.tmp-{token}"), os.path.join(parent, f".{name}.old-{token}")
    os.makedirs(staging)
    try:
        await fill(staging)
        _fsync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.exists(path):
        os.rename(path, aside)  # until the next rename, resolve() falls back to this copy
    os.rename(staging, path)
    _fsync_dir(parent)
    shutil.rmtree(aside, ignore_errors=True)
    return path


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            fd = os.open(os.path.join(dirpath, filename), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


def write_json(path: str, obj: dict) -> None:
    """Atomically (temp file, fsync, rename)."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def set_latest(checkpoint_dir: str, path: str) -> None:
    """Point `latest` at `path` (a checkpoint inside checkpoint_dir), atomically."""
    tmp = os.path.join(checkpoint_dir, f".{LATEST}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        f.write(os.path.basename(path) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(checkpoint_dir, LATEST))
    _fsync_dir(checkpoint_dir)


def prune(checkpoint_dir: str, keep: int) -> list[str]:
    """Remove all but the newest `keep` step checkpoints (0: keep all; `latest`'s is always
    kept) and staging dirs of saves that never finished. Returns the removed paths."""
    removed = []
    steps = sorted((int(m.group(1)), e) for e in os.listdir(checkpoint_dir) if (m := _STEP_DIR.match(e)))
    latest_name = _read_latest(checkpoint_dir)
    doomed = [name for _, name in steps[:-keep]] if keep else []
    doomed += [e for e in os.listdir(checkpoint_dir) if e.startswith(".step_") and (".tmp-" in e or ".old-" in e)]
    for name in doomed:
        if name != latest_name:
            shutil.rmtree(os.path.join(checkpoint_dir, name), ignore_errors=True)
            removed.append(os.path.join(checkpoint_dir, name))
    return removed


async def save(path: str, handles, controller_state: dict, model_dir: str) -> str:
    """Write a checkpoint at `path` atomically: the trainer's DCP state and HF weights, the
    model's config and tokenizer, each generator replica's sampling state and
    `controller_state` (step, policy version, data position, config, mesh)."""

    async def fill(staging: str) -> None:
        await handles.trainer.save(os.path.join(staging, TRAINER_DIR))
        await handles.trainer.export_hf(staging)
        copy_hf_assets(model_dir, staging)
        sampling = await asyncio.gather(*(g.sampling_state() for g in handles.generators))
        state = {"format": FORMAT, **controller_state, "generators": list(sampling), "model": model_config(model_dir)}
        write_json(os.path.join(staging, STATE_FILE), state)

    return await write_atomically(path, fill)


def copy_hf_assets(model_dir: str, dst: str) -> None:
    """config.json, tokenizer and generation files of the model (not its weights) into dst,
    so dst with its model.safetensors is a HF checkpoint of the same model."""
    for entry in sorted(os.listdir(model_dir)):
        src = os.path.join(model_dir, entry)
        if os.path.isfile(src) and not entry.endswith(_WEIGHT_SUFFIXES):
            shutil.copyfile(src, os.path.join(dst, entry))


# --- reading -----------------------------------------------------------------------------


def _read_latest(checkpoint_dir: str) -> str | None:
    try:
        with open(os.path.join(checkpoint_dir, LATEST)) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def latest(checkpoint_dir: str) -> str | None:
    """The checkpoint `latest` points to in checkpoint_dir, or None if there is none."""
    name = _read_latest(checkpoint_dir) if os.path.isdir(checkpoint_dir) else None
    return _existing(os.path.join(checkpoint_dir, name)) if name else None


def _existing(path: str) -> str | None:
    """path, or the copy renamed aside while a save replaced it (a crash between two renames)."""
    if os.path.isdir(path):
        return path
    parent, name = os.path.split(path)
    asides = sorted(e for e in os.listdir(parent) if e.startswith(f".{name}.old-")) if os.path.isdir(parent) else []
    return os.path.join(parent, asides[0]) if asides else None


def resolve(path: str) -> str:
    """A checkpoint dir from: a checkpoint dir, a checkpoints dir, or a run's log dir (their `latest`)."""
    path = os.path.abspath(path)
    found = _existing(path)
    if found is None:
        raise CheckpointError(f"checkpoint {path} does not exist; pass a run's log dir or one of its checkpoints")
    if os.path.isfile(os.path.join(found, STATE_FILE)) or os.path.isdir(os.path.join(found, TRAINER_DIR)):
        return found
    for checkpoint_dir in (found, os.path.join(found, "checkpoints"), _run_checkpoint_dir(found)):
        if checkpoint_dir and _read_latest(checkpoint_dir):
            target = latest(checkpoint_dir)
            if target is None:
                raise CheckpointError(
                    f"{checkpoint_dir}/{LATEST} names {_read_latest(checkpoint_dir)!r}, which is gone; "
                    "pass one of the checkpoints there"
                )
            return target
    raise CheckpointError(
        f"no checkpoint in {path} (no {STATE_FILE}, no {LATEST} pointer): the run saved none "
        "(set loop.save_every) or this is not a run's log dir"
    )


def _run_checkpoint_dir(run_dir: str) -> str | None:
    """loop.checkpoint_dir of the run whose log dir this is (from its config.json)."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            return json.load(f)["config"]["loop"]["checkpoint_dir"] or None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_state(path: str) -> dict:
    """lockstep.json of a complete checkpoint; one clear line if it is not one."""
    for required in (STATE_FILE, os.path.join(TRAINER_DIR, ".metadata"), HF_WEIGHTS):
        if not os.path.isfile(os.path.join(path, required)):
            raise CheckpointError(
                f"checkpoint {path} is incomplete (no {required}): a save that did not finish, or a "
                "partial copy; use another checkpoint of the run"
            )
    try:
        with open(os.path.join(path, STATE_FILE)) as f:
            state = json.load(f)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} is not valid JSON ({e}); the checkpoint is damaged") from None
    if state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {state.get('format')!r}; this lockstep reads format {FORMAT}")
    return state


def model_config(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)


def check_same_model(state: dict, model_dir: str, path: str) -> None:
    """Refuse a checkpoint of another architecture (its DCP would not load, or load wrongly)."""
    saved, current = state["model"], model_config(model_dir)
    keys = sorted((set(saved) | set(current)) - set(_MODEL_KEYS_IGNORED))
    differing = [k for k in keys if saved.get(k) != current.get(k)]
    if differing:
        shown = ", ".join(f"{k} {saved.get(k)!r} vs {current.get(k)!r}" for k in differing[:3])
        raise CheckpointError(
            f"checkpoint {path} is of another model ({shown}, checkpoint vs model.path); "
            "load it with the model.path it was trained from"
        )


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: dict, new: dict) -> list[str]:
    """'key (old -> new)' for each config key that differs and may not change on resume."""
    old_flat, new_flat = _flatten(saved), _flatten(new)
    changes = []
    for key in sorted(set(old_flat) | set(new_flat)):
        if key.startswith(RESUME_MAY_CHANGE) or old_flat.get(key) == new_flat.get(key):
            continue
        changes.append(f"{key} ({old_flat.get(key)!r} -> {new_flat.get(key)!r})")
    return changes
