"""The divergence audit: which module makes the generator and the trainer disagree.

When the strict barrier halts, the failing sample is re-run on both sides with forward hooks
(lockstep.models.qwen3.capture): the generator samples its prompt alone with the same seed
(batch invariance gives the same tokens), recording every module's output over the prefill
and each decode step; the trainer scores those tokens alone in its packed forward, recording
the same modules. The controller then finds the earliest token position at which any module
output differs in any bit, and at that position the first module in forward order. Its
inputs at positions up to there are compared too: when they are equal, that module's own
computation differs. When every module agrees but a logprob does not, the sampler's step
(log_softmax of logits / temperature, then the gather) is to blame.

    report = session.audit()            # the last strict-barrier failure of the session
    lockstep audit --run runs/<stamp>   # the same from a run's saved sample and weights
"""

import dataclasses
import json
import os
from dataclasses import dataclass

import torch

from lockstep.actors.types import Sample
from lockstep.controller.barrier import float_bits
from lockstep.models.qwen3.capture import Activations, CapturedRun

AUDIT_DIR = "audit"  # under the run's log_dir: the failing sample and the weights it was sampled with
FAILURE_FILE = "failure.pt"
CHECKPOINT_DIR = "checkpoint"
LOGPROBS = "logprobs"  # the pseudo-module after lm_head: log_softmax(logits / T) and the gather


@dataclass
class FailedSample:
    """What the strict barrier halted on: enough to re-run the sample on both sides."""

    sample: Sample
    token_position: int  # completion token whose logprobs differed first (audited up to it)
    temperature: float
    step: int = 0
    sample_index: int = 0  # in the step's sample list
    replica: int = 0  # generator replica that sampled it
    trainer_logprobs: torch.Tensor | None = None  # fp32 [len(completion_ids)], the barrier's trainer side

    def save(self, path: str) -> None:
        state = dataclasses.asdict(self)
        # Dataset columns as JSON text: the file then loads with weights_only=True.
        state["sample"]["fields"] = json.dumps(self.sample.fields, default=str)
        torch.save(state, path)

    @classmethod
    def load(cls, path: str) -> "FailedSample":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no failing sample at {path}: the run's strict barrier never halted there")
        state = torch.load(path, weights_only=True)
        state["sample"]["fields"] = json.loads(state["sample"]["fields"])
        state["sample"] = Sample(**state["sample"])
        return cls(**state)


@dataclass(frozen=True)
class Divergence:
    """The first (position, module) whose outputs differ in any bit."""

    module: str  # e.g. "layers.1.ffn_norm"; LOGPROBS when every module agrees
    position: int  # row of prompt + completion
    output_index: int  # which output (fused norms return (normed, x + residual))
    num_differing: int  # elements of that row whose bits differ
    num_elements: int
    max_abs_diff: float
    generator_value: float  # the first differing element on each side
    trainer_value: float
    inputs_equal: bool  # the module's inputs at positions <= position are bitwise equal


@dataclass(frozen=True)
class AuditReport:
    step: int
    sample_index: int
    policy_version: int
    token_position: int  # the audited completion token (the barrier's first mismatch)
    num_prompt_tokens: int
    generator_reproduced: bool  # alone, the generator sampled the step's tokens and logprobs
    trainer_reproduced: bool | None  # alone, the trainer gave the barrier's logprobs (None: nothing to compare)
    num_modules: int  # modules compared on both sides
    num_positions: int  # positions compared (0 .. the audited token's row)
    divergence: Divergence | None  # None: nothing differs up to the audited token

    @property
    def module(self) -> str | None:
        return None if self.divergence is None else self.divergence.module

    def summary(self) -> str:
        lines = [
            f"lockstep audit: step {self.step}, sample {self.sample_index}, policy v{self.policy_version}, "
            f"completion token {self.token_position} (position {self.num_prompt_tokens + self.token_position} "
            f"after a {self.num_prompt_tokens}-token prompt)",
            "  generator alone: " + ("same tokens and logprobs as in the step" if self.generator_reproduced else
                                     "DIFFERENT tokens or logprobs than in the step: alone it does not reproduce "
                                     "(batch-dependent results, or generator state that is gone)"),
        ]
        if self.trainer_reproduced is not None:
            lines.append("  trainer alone:   " + ("same logprobs as at the barrier" if self.trainer_reproduced else
                                                  "DIFFERENT logprobs than at the barrier: its result depends on the micro-batch"))
        d = self.divergence
        if d is None:
            lines.append(
                f"  no difference: the outputs of {self.num_modules} modules at positions 0..{self.num_positions - 1} and "
                f"the logprobs up to token {self.token_position} are bitwise equal on both sides"
            )
            return "\n".join(lines)
        where = (f"prompt token {d.position}" if d.position < self.num_prompt_tokens
                 else f"completion token {d.position - self.num_prompt_tokens}")
        output = f" (output {d.output_index})" if d.output_index else ""
        lines += [
            f"  first difference: {d.module}{output} at position {d.position} ({where})",
            f"    {d.num_differing} of {d.num_elements} elements differ, max |diff| {d.max_abs_diff:.3e}; "
            f"first: generator {float_bits(d.generator_value)} vs trainer {float_bits(d.trainer_value)}",
        ]
        if d.module == LOGPROBS:
            lines.append("    every module output agrees: the logprob step (log_softmax of logits / T, gather) differs")
        elif d.inputs_equal:
            lines.append(f"    its inputs are bitwise equal on both sides: {d.module} itself computes differently")
        else:
            lines.append("    its inputs already differ: an op between the recorded modules (rope, residual add, "
                         "reshape, ...) feeding it differs")
        return "\n".join(lines)


# --- comparison --------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a float tensor: equality of bits (-0.0 != 0.0, a NaN equals itself)."""
    if not t.is_floating_point():
        return t
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bool [num_rows]: rows of a and b equal in every bit (token ids and positions by value:
    vLLM keeps them int32 where the trainer has int64)."""
    if not a.is_floating_point() and not b.is_floating_point():
        a, b = a.long(), b.long()
    if a.shape != b.shape or a.dtype != b.dtype:
        return torch.zeros(a.shape[0], dtype=torch.bool)
    equal = _bits(a) == _bits(b)
    return equal.flatten(1).all(dim=1) if equal.dim() > 1 else equal


def _rows(acts: Activations, module: str, positions: list[int]) -> torch.Tensor:
    index = {int(p): i for i, p in enumerate(acts.positions[module])}
    return torch.tensor([index[p] for p in positions], dtype=torch.int64)


def _describe(module, position, output_index, a: torch.Tensor, b: torch.Tensor, inputs_equal) -> Divergence:
    """a, b: one row of each side."""
    if a.shape != b.shape:
        nan = float("nan")
        return Divergence(module, position, output_index, a.numel(), a.numel(), nan, nan, nan, inputs_equal)
    differs = (_bits(a) != _bits(b)).flatten()
    first = int(differs.nonzero()[0, 0])
    diff = (a.double() - b.double()).abs().flatten()
    return Divergence(
        module=module, position=position, output_index=output_index,
        num_differing=int(differs.sum()), num_elements=differs.numel(), max_abs_diff=float(diff.max()),
        generator_value=float(a.flatten()[first]), trainer_value=float(b.flatten()[first]),
        inputs_equal=inputs_equal,
    )


def _inputs_equal(gen: Activations, train: Activations, module: str, position: int) -> bool:
    g_pos = set(gen.positions[module].tolist())
    positions = [p for p in train.positions[module].tolist() if p <= position and p in g_pos]
    g, t = gen.inputs[module], train.inputs[module]
    if len(g) != len(t):
        return False
    gi, ti = _rows(gen, module, positions), _rows(train, module, positions)
    return all(bool(_same(a[gi], b[ti]).all()) for a, b in zip(g, t))


def first_divergence(gen: CapturedRun, train: CapturedRun, last_position: int) -> tuple[Divergence | None, int]:
    """The earliest position <= last_position where a module output (or a logprob) differs,
    and at it the first module in forward order. Returns (divergence, number of modules compared)."""
    ga, ta = gen.activations, train.activations
    modules = [m for m in ta.order if m in ga.outputs]
    best = None  # (position, module rank, output index, module)
    for rank, module in enumerate(modules):
        g_pos = set(ga.positions[module].tolist())
        positions = [p for p in ta.positions[module].tolist() if p <= last_position and p in g_pos]
        if not positions:
            continue
        gi, ti = _rows(ga, module, positions), _rows(ta, module, positions)
        g_out, t_out = ga.outputs[module], ta.outputs[module]
        if len(g_out) != len(t_out):
            best = min(best or (positions[0], rank, 0, module), (positions[0], rank, 0, module))
            continue
        for k, (a, b) in enumerate(zip(g_out, t_out)):
            same = _same(a[gi], b[ti])
            if not bool(same.all()):
                candidate = (positions[int((~same).nonzero()[0, 0])], rank, k, module)
                best = candidate if best is None else min(best, candidate)
    # The logprob of completion token j is computed from the row before it.
    num_prompt = len(train.prompt_ids)
    num_tokens = min(len(gen.logprobs), len(train.logprobs), last_position - num_prompt + 2)
    same = _same(gen.logprobs[:num_tokens, None], train.logprobs[:num_tokens, None])
    if not bool(same.all()):
        j = int((~same).nonzero()[0, 0])
        candidate = (num_prompt - 1 + j, len(modules), 0, LOGPROBS)
        best = candidate if best is None else min(best, candidate)
    if best is None:
        return None, len(modules)

    position, _, k, module = best
    if module == LOGPROBS:
        j = position - num_prompt + 1
        head = "output" if "output" in modules else None
        inputs_equal = head is not None and _output_equal_at(ga, ta, head, position)
        return _describe(LOGPROBS, position, 0, gen.logprobs[j:j + 1], train.logprobs[j:j + 1], inputs_equal), len(modules)
    if len(ga.outputs[module]) != len(ta.outputs[module]):
        a = torch.zeros(len(ga.outputs[module]))
        return _describe(module, position, 0, a, torch.zeros(len(ta.outputs[module])), False), len(modules)
    (gi,), (ti,) = _rows(ga, module, [position]), _rows(ta, module, [position])
    divergence = _describe(module, position, k, ga.outputs[module][k][gi], ta.outputs[module][k][ti],
                           _inputs_equal(ga, ta, module, position))
    return divergence, len(modules)


def _output_equal_at(ga: Activations, ta: Activations, module: str, position: int) -> bool:
    if position not in set(ga.positions[module].tolist()) or position not in set(ta.positions[module].tolist()):
        return False
    (gi,), (ti,) = _rows(ga, module, [position]), _rows(ta, module, [position])
    return all(bool(_same(a[gi:gi + 1], b[ti:ti + 1]).all()) for a, b in zip(ga.outputs[module], ta.outputs[module]))


# --- running it --------------------------------------------------------------------------


async def run_audit(generators: list, trainer, failed: FailedSample) -> AuditReport:
    """Re-run `failed` on its generator replica and on the trainer (handles with the `audit`
    endpoints), then compare. Both sides must hold the sample's policy version."""
    sample, j = failed.sample, failed.token_position
    if sample.seed is None:
        raise ValueError(
            f"sample {failed.sample_index} has no sampling seed, so the generator cannot re-sample it; "
            "audit samples that lockstep's generator made"
        )
    if not 0 <= j < len(sample.completion_ids):
        raise ValueError(f"audit: token {j} is outside the sample's {len(sample.completion_ids)} completion tokens")
    version = sample.policy_version
    # Any replica re-samples it (same weights, the seed travels with the sample); prefer its own.
    replica = failed.replica if failed.replica < len(generators) else 0
    # Sampling stops at token j: the generator's last forward is the row that predicts it.
    gen = await generators[replica].audit(sample.prompt_ids, sample.seed, failed.temperature, j + 1, version)
    # The trainer scores the tokens the re-run sampled, so both sides see one sequence.
    rerun = dataclasses.replace(sample, completion_ids=gen.completion_ids, logprobs=gen.logprobs)
    train = await trainer.audit(rerun, failed.temperature, version)

    num_prompt = len(sample.prompt_ids)
    num_tokens = len(gen.completion_ids)
    same_tokens = gen.completion_ids == sample.completion_ids[:j + 1]
    generator_reproduced = same_tokens and torch.equal(_bits(gen.logprobs), _bits(sample.logprobs[:j + 1]))
    trainer_reproduced = None
    if failed.trainer_logprobs is not None and same_tokens:
        trainer_reproduced = torch.equal(_bits(train.logprobs), _bits(failed.trainer_logprobs[:j + 1]))
    last_position = num_prompt - 1 + num_tokens - 1
    divergence, num_modules = first_divergence(gen, train, last_position)
    return AuditReport(
        step=failed.step, sample_index=failed.sample_index, policy_version=version,
        token_position=num_tokens - 1, num_prompt_tokens=num_prompt,
        generator_reproduced=generator_reproduced, trainer_reproduced=trainer_reproduced,
        num_modules=num_modules, num_positions=last_position + 1, divergence=divergence,
    )
