"""The bitwise barrier: generator vs trainer logprobs of the same sampled tokens.

Policies (`loop.barrier`):
  strict   halt the step before the optimizer at the first token whose two fp32
           logprobs differ in any bit, printing both values exactly;
  measure  count differing tokens, max |diff| and a KL estimate, then train anyway;
  off      skip the comparison (the trainer's logprobs still come from its training forward).
"""

from dataclasses import dataclass

import torch

POLICIES = ("strict", "measure", "off")


class BarrierError(RuntimeError):
    """Generator and trainer logprobs differ under `loop.barrier=strict`; `report` says where."""

    def __init__(self, message: str, report: "BarrierReport | None" = None):
        super().__init__(message)
        self.report = report
        self.failed = None  # the loop attaches the FailedSample (controller/audit.py)


@dataclass(frozen=True)
class Mismatch:
    sample_index: int  # index into the step's sample list
    position: int  # completion token position
    token_id: int
    generator_value: float
    trainer_value: float


@dataclass(frozen=True)
class BarrierReport:
    num_tokens: int
    num_differing_tokens: int  # tokens whose fp32 logprobs differ in any bit
    max_abs_diff: float
    kl: float  # k3 estimate of KL(generator || trainer) per token, sampled from the generator
    first_mismatch: Mismatch | None

    def as_metrics(self) -> dict[str, float]:
        return {
            "barrier/num_tokens": self.num_tokens,
            "barrier/num_differing_tokens": self.num_differing_tokens,
            "barrier/max_abs_diff": self.max_abs_diff,
            "barrier/kl": self.kl,
        }


def float_bits(value: float) -> str:
    """Exact text of an fp32 value: shortest repr that round-trips plus its bit pattern."""
    t = torch.tensor([value], dtype=torch.float32)
    bits = t.view(torch.int32).item() & 0xFFFFFFFF
    return f"{t.item()!r} (0x{bits:08x})"


def compare(
    generator_logprobs: list[torch.Tensor],
    trainer_logprobs: list[torch.Tensor],
    token_ids: list[list[int]] | None = None,
) -> BarrierReport:
    """Compare per-sample fp32 logprob vectors bit for bit."""
    if len(generator_logprobs) != len(trainer_logprobs):
        raise ValueError(
            f"barrier: {len(generator_logprobs)} generator samples but "
            f"{len(trainer_logprobs)} trainer samples; the trainer must score every sample"
        )
    num_tokens = num_differing = 0
    max_abs_diff = 0.0
    kl_sum = 0.0
    first = None
    for i, (gen, train) in enumerate(zip(generator_logprobs, trainer_logprobs)):
        if gen.shape != train.shape or gen.dtype != torch.float32 or train.dtype != torch.float32:
            raise ValueError(
                f"barrier: sample {i} has generator logprobs {tuple(gen.shape)} {gen.dtype} but "
                f"trainer logprobs {tuple(train.shape)} {train.dtype}; both must be fp32 of one "
                "value per completion token"
            )
        gen, train = gen.detach().cpu(), train.detach().cpu()
        differs = gen.view(torch.int32) != train.view(torch.int32)  # [num_completion_tokens]
        num_tokens += gen.numel()
        num_differing += int(differs.sum())
        if gen.numel():
            diff = (gen.double() - train.double()).abs()
            max_abs_diff = max(max_abs_diff, float(diff.max()))
            # k3 = (r - 1) - log r with r = p_train / p_gen: unbiased, never negative.
            log_ratio = train.double() - gen.double()
            kl_sum += float((log_ratio.exp() - 1 - log_ratio).sum())
        if first is None and bool(differs.any()):
            pos = int(differs.nonzero()[0, 0])
            first = Mismatch(
                sample_index=i,
                position=pos,
                token_id=token_ids[i][pos] if token_ids is not None else -1,
                generator_value=float(gen[pos]),
                trainer_value=float(train[pos]),
            )
    return BarrierReport(
        num_tokens=num_tokens,
        num_differing_tokens=num_differing,
        max_abs_diff=max_abs_diff,
        kl=kl_sum / num_tokens if num_tokens else 0.0,
        first_mismatch=first,
    )


def describe(report: BarrierReport) -> str:
    m = report.first_mismatch
    if m is None:
        return f"all {report.num_tokens} token logprobs are bitwise equal"
    return (
        f"sample {m.sample_index} token {m.position} (id {m.token_id}): generator "
        f"{float_bits(m.generator_value)} != trainer {float_bits(m.trainer_value)}; "
        f"{report.num_differing_tokens} of {report.num_tokens} tokens differ, "
        f"max |diff| {report.max_abs_diff:.3e}"
    )


def check(
    policy: str,
    generator_logprobs: list[torch.Tensor],
    trainer_logprobs: list[torch.Tensor],
    token_ids: list[list[int]] | None = None,
) -> BarrierReport | None:
    """Apply `policy`. Returns the report (None for `off`); raises BarrierError under `strict`."""
    if policy not in POLICIES:
        raise ValueError(f"loop.barrier={policy!r} is not one of {'|'.join(POLICIES)}")
    if policy == "off":
        return None
    report = compare(generator_logprobs, trainer_logprobs, token_ids)
    if policy == "strict" and report.first_mismatch is not None:
        raise BarrierError(
            f"barrier (strict): {describe(report)}. The optimizer step was not taken; "
            "run with loop.barrier=measure to train anyway and count differences.",
            report,
        )
    return report
