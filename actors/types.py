"""Messages that cross actor boundaries. Plain dataclasses: Monarch pickles them.

Logprobs travel as fp32 tensors (never Python float lists) so the bitwise barrier
compares exactly the bits each side computed.
"""

from dataclasses import dataclass, field

import torch


@dataclass
class Sample:
    """One sampled completion of one prompt."""

    prompt_index: int  # index of the prompt in the step's prompt list
    prompt: str
    completion: str
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: torch.Tensor  # fp32 [len(completion_ids)], generator's processed logprobs
    policy_version: int  # trainer weight version the generator sampled with
    fields: dict = field(default_factory=dict)  # dataset columns (e.g. the reference answer)
    reward: float | None = None
    advantage: float | None = None
    seed: int | None = None  # vLLM sampling seed of this completion: alone, it samples the same tokens


@dataclass
class TrainBatch:
    """What the trainer needs for one optimizer step: samples with advantages set."""

    samples: list[Sample]
    temperature: float  # logprobs are of logits / temperature, as the generator sampled
