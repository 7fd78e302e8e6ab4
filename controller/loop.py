"""One RL step, written against actor handles so tests can pass fakes.

(weight fingerprints: trainer = every generator, at version k) -> prompts -> generate
(policy version k, checked by the generators) -> rewards -> advantages -> trainer forward +
backward (its logprobs of the same tokens) -> barrier -> optimizer step -> push weights (k+1)
-> generators pull (k+1).

A handle is any object with the role's async methods (docs/architecture.md); the
Monarch meshes are wrapped to look like that in controller/session.py.
"""

import asyncio
import statistics
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from lockstep.actors.grpo import assign_advantages
from lockstep.actors.reward_runner import RewardTimeoutWarning
from lockstep.actors.types import Sample, TrainBatch
from lockstep.controller import barrier as barrier_mod
from lockstep.controller.audit import FailedSample


class WeightMismatchError(RuntimeError):
    """A generator's weights are not the trainer's (fingerprints differ): the step is refused."""


@dataclass
class Handles:
    generators: list[Any]  # one per data-parallel replica: generate, update_weights, version, fingerprint
    trainer: Any  # forward_backward, optimizer_step, drop_gradients, push_weights, version, fingerprint, ...
    reward: Any  # score(samples) -> reward_runner.Scores, already merged over the reward ranks


@dataclass
class StepResult:
    metrics: dict
    samples: list[Sample]
    policy_version: int  # the version trainer and generators hold after the step


@contextmanager
def _timed(times: dict, phase: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        times[f"time/{phase}"] = time.perf_counter() - start


def split_evenly(num_items: int, num_parts: int) -> list[tuple[int, int]]:
    """[start, end) ranges of contiguous chunks whose sizes differ by at most one."""
    base, extra = divmod(num_items, num_parts)
    ranges, start = [], 0
    for part in range(num_parts):
        end = start + base + (part < extra)
        ranges.append((start, end))
        start = end
    return ranges


async def generate(
    generators: list[Any],
    prompts: list[str],
    fields: list[dict],
    policy_version: int,
    num_samples: int | None = None,
    **sampling,
) -> list[Sample]:
    """Prompts split across the replicas; prompt_index made global; versions verified."""
    chunks = [(a, b) for a, b in split_evenly(len(prompts), len(generators)) if b > a]
    outputs = await asyncio.gather(
        *(
            generators[i].generate(prompts[a:b], fields[a:b], policy_version, num_samples, **sampling)
            for i, (a, b) in enumerate(chunks)
        )
    )
    samples = []
    for (start, _), chunk in zip(chunks, outputs):
        for sample in chunk:
            sample.prompt_index += start  # replicas index their own sub-list
            if sample.policy_version != policy_version:
                raise RuntimeError(
                    f"generator sampled prompt {sample.prompt_index} with policy version "
                    f"{sample.policy_version}, expected {policy_version}; weights are out of sync"
                )
            samples.append(sample)
    return samples


async def verify_weights(handles: Handles, policy_version: int) -> None:
    """Every generator replica holds the trainer's weights at `policy_version`, bit for bit
    (layout-independent fingerprints, actors/weight_sync.py); else WeightMismatchError
    naming the replica and the first differing parameter."""
    expected, *replicas = await asyncio.gather(
        handles.trainer.fingerprint(), *(g.fingerprint() for g in handles.generators)
    )
    if expected.version != policy_version:
        raise WeightMismatchError(f"the trainer holds weights v{expected.version}, the step expects v{policy_version}")
    for i, got in enumerate(replicas):
        difference = expected.first_difference(got)
        if difference is not None:
            raise WeightMismatchError(
                f"generator[{i}] does not hold the trainer's weights v{policy_version}: {difference}; "
                "the step was refused before sampling"
            )


def _reward_metrics(samples: list[Sample]) -> dict:
    rewards = [s.reward for s in samples]
    lengths = [len(s.completion_ids) for s in samples]
    return {
        "reward/mean": statistics.fmean(rewards),
        "reward/std": statistics.pstdev(rewards),
        "reward/max": max(rewards),
        "completion/len_mean": statistics.fmean(lengths),  # tokens
        "completion/len_chars": statistics.fmean(len(s.completion) for s in samples),
    }


def _failed_sample(mismatch, samples, trainer_logprobs, prompts, num_replicas, temperature, step) -> FailedSample:
    """The sample the strict barrier halted on, with what the audit needs to re-run it."""
    sample = samples[mismatch.sample_index]
    chunks = split_evenly(len(prompts), num_replicas)
    replica = next(i for i, (a, b) in enumerate(chunks) if a <= sample.prompt_index < b)
    return FailedSample(
        sample=sample, token_position=mismatch.position, temperature=temperature, step=step,
        sample_index=mismatch.sample_index, replica=replica,
        trainer_logprobs=trainer_logprobs[mismatch.sample_index].detach().cpu(),
    )


async def _drop_gradients(trainer) -> str:
    """After a refused step: the next forward_backward starts from zero gradients anyway, so a
    failure here only adds a note to the barrier's error, which stays the one raised."""
    try:
        await trainer.drop_gradients()
    except Exception as e:
        return f" (dropping the trainer's gradients failed: {e!r})"
    return ""


async def run_step(
    handles: Handles,
    prompts: list[str],
    fields: list[dict],
    policy_version: int,
    *,
    barrier: str,
    temperature: float,
    num_samples: int | None = None,
    step: int = 0,
    check_weights: bool = False,
) -> StepResult:
    """One synchronous on-policy step. Raises before the optimizer on reward or barrier errors;
    a strict-barrier BarrierError carries `.failed`, the FailedSample to audit. With
    check_weights, a generator whose weights differ from the trainer's refuses the step
    before any sampling (WeightMismatchError)."""
    times: dict[str, float] = {}
    step_start = time.perf_counter()

    if check_weights:
        with _timed(times, "verify"):
            try:
                await verify_weights(handles, policy_version)
            except WeightMismatchError as e:
                e.args = (f"step {step}: {e}",)
                raise

    with _timed(times, "generate"):
        samples = await generate(handles.generators, prompts, fields, policy_version, num_samples)
    if not samples:
        raise RuntimeError("the generators returned no samples for this step's prompts")

    with _timed(times, "reward"):
        scores = await handles.reward.score(samples)
        if len(scores.values) != len(samples):
            raise RuntimeError(f"reward mesh returned {len(scores.values)} scores for {len(samples)} samples")
        for sample, reward in zip(samples, scores.values):
            sample.reward = reward
        assign_advantages(samples)
    if scores.num_timeouts:  # reward.on_timeout=default: the step goes on, the user is told
        more = f" (and {len(scores.timeouts) - 1} more calls)" if len(scores.timeouts) > 1 else ""
        warnings.warn(f"step {step}: {scores.num_timeouts} of {len(samples)} samples timed out: "
                      f"{scores.timeouts[0]}{more}", RewardTimeoutWarning, stacklevel=1)

    report = None
    with _timed(times, "train"):
        # The barrier checks the logprobs of the training forward itself, before the optimizer.
        trainer_logprobs = await handles.trainer.forward_backward(TrainBatch(samples=samples, temperature=temperature))
        try:
            report = barrier_mod.check(
                barrier,
                [s.logprobs for s in samples],
                trainer_logprobs,
                [s.completion_ids for s in samples],
            )
        except barrier_mod.BarrierError as e:
            e.args = (f"step {step}: {e}{await _drop_gradients(handles.trainer)}",)
            e.failed = _failed_sample(e.report.first_mismatch, samples, trainer_logprobs, prompts,
                                      len(handles.generators), temperature, step)
            raise
        train_stats = await handles.trainer.optimizer_step()

    new_version = policy_version + 1
    with _timed(times, "sync"):
        await handles.trainer.push_weights(new_version)
        await asyncio.gather(*(g.update_weights(new_version) for g in handles.generators))
    times["time/step"] = time.perf_counter() - step_start

    num_generated = sum(len(s.completion_ids) for s in samples)
    metrics = {"step": step, "policy_version": new_version, "num_samples": len(samples)}
    metrics.update(_reward_metrics(samples))
    metrics["reward/num_timeouts"] = scores.num_timeouts
    metrics.update({f"train/{k}": float(v) for k, v in train_stats.items()})
    if report is not None:
        metrics.update(report.as_metrics())
    metrics.update(times)
    metrics["perf/tokens_per_s"] = num_generated / times["time/step"]
    metrics["perf/generate_tokens_per_s"] = num_generated / max(times["time/generate"], 1e-9)
    return StepResult(metrics=metrics, samples=samples, policy_version=new_version)
