"""Samples -> one flat token stream for the trainer's packed forward (varlen attention, no padding).

Completion token j of a sample sits at row start + len(prompt) + j and is predicted by the row
before it, so its logprob is read from the logits of row start + len(prompt) + j - 1.
"""

from dataclasses import dataclass

import torch

from lockstep.actors.types import Sample


@dataclass
class PackedBatch:
    """Samples as one token stream. T = total tokens, N = total completion tokens."""

    tokens: torch.Tensor  # int64 [T], prompt + completion of each sample, back to back
    positions: torch.Tensor  # int64 [T], 0.. within each sample
    cu_seqlens: torch.Tensor  # int32 [num_seqs + 1], sample i is rows [cu[i], cu[i+1])
    target_index: torch.Tensor  # int64 [N], the row whose logits predict target_ids
    target_ids: torch.Tensor  # int64 [N], completion tokens in sample order
    num_targets: list[int]  # [num_seqs], len(completion_ids) of each sample

    def to(self, device: torch.device) -> "PackedBatch":
        return PackedBatch(
            self.tokens.to(device), self.positions.to(device), self.cu_seqlens.to(device),
            self.target_index.to(device), self.target_ids.to(device), self.num_targets,
        )


def pack_samples(samples: list[Sample]) -> PackedBatch:
    tokens, positions, target_index, target_ids = [], [], [], []
    cu_seqlens, num_targets = [0], []
    for i, sample in enumerate(samples):
        num_prompt, num_completion = len(sample.prompt_ids), len(sample.completion_ids)
        if num_prompt == 0:
            raise ValueError(f"sample {i} has no prompt_ids: its first completion token would have no context")
        start = cu_seqlens[-1]
        seq = list(sample.prompt_ids) + list(sample.completion_ids)
        tokens.extend(seq)
        positions.extend(range(len(seq)))
        target_index.extend(range(start + num_prompt - 1, start + num_prompt - 1 + num_completion))
        target_ids.extend(sample.completion_ids)
        cu_seqlens.append(start + len(seq))
        num_targets.append(num_completion)
    return PackedBatch(
        tokens=torch.tensor(tokens, dtype=torch.int64),
        positions=torch.tensor(positions, dtype=torch.int64),
        cu_seqlens=torch.tensor(cu_seqlens, dtype=torch.int32),
        target_index=torch.tensor(target_index, dtype=torch.int64),
        target_ids=torch.tensor(target_ids, dtype=torch.int64),
        num_targets=num_targets,
    )


# A two-token sequence (one target) that ranks with fewer micro-batches run, so every rank
# makes the same FSDP collectives.
FILLER = pack_samples(
    [Sample(prompt_index=-1, prompt="", completion="", prompt_ids=[0], completion_ids=[0],
            logprobs=torch.zeros(1), policy_version=-1)]
)
