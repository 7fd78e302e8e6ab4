"""Fake actors for the loop: plain objects with the real endpoints' async methods.

Every call is appended to a shared `calls` list so tests can check the order of phases.
"""

import zlib

import torch

from lockstep.actors.types import Sample
from lockstep.actors.weight_sync import fingerprint


def fake_weights(version: int) -> dict[str, torch.Tensor]:
    """The fake policy's weights at `version` (HF names)."""
    g = torch.Generator().manual_seed(version)
    return {"model.embed_tokens.weight": torch.randn(6, 4, generator=g), "model.norm.weight": torch.ones(4)}


def fake_logprobs(prompt: str, k: int, length: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(f"{prompt}|{k}".encode()))
    return -torch.rand(length, generator=g, dtype=torch.float32) * 3  # fp32 [length]


class FakeGenerator:
    def __init__(self, calls: list, name: str = "gen0", num_samples: int = 2, version: int = 0):
        self.calls, self.name, self.num_samples, self.weights_version = calls, name, num_samples, version

    async def generate(self, prompts, fields, expected_version, n=None, **sampling):
        self.calls.append((self.name, "generate", len(prompts)))
        if expected_version != self.weights_version:
            raise RuntimeError(
                f"generator holds policy version {self.weights_version}, asked for {expected_version}"
            )
        n = n or self.num_samples
        out = []
        for i, (prompt, f) in enumerate(zip(prompts, fields)):
            for k in range(n):
                completion = str(k)  # sample k answers "k"
                ids = [ord(c) for c in completion] + [0]
                out.append(Sample(
                    prompt_index=i, prompt=prompt, completion=completion,
                    prompt_ids=[ord(c) for c in prompt], completion_ids=ids,
                    logprobs=fake_logprobs(prompt, k, len(ids)),
                    policy_version=self.weights_version, fields=dict(f),
                ))
        return out

    async def update_weights(self, version):
        self.calls.append((self.name, "update_weights", version))
        self.weights_version = version
        self.weights = fake_weights(version)

    async def version(self):
        return self.weights_version

    async def fingerprint(self):
        self.calls.append((self.name, "fingerprint", self.weights_version))
        return fingerprint(getattr(self, "weights", None) or fake_weights(self.weights_version), self.weights_version)


class FakeTrainer:
    """Scores like the generator unless `flip` = (sample_index, position) flips one bit."""

    def __init__(self, calls: list, flip: tuple[int, int] | None = None):
        self.calls, self.flip = calls, flip
        self.weights_version = 0  # the version it last pushed
        self.trained_version = 0  # optimizer steps taken
        self.batches = []  # the batches optimizer_step applied
        self.pending = None

    def _score(self, samples):
        out = [s.logprobs.clone() for s in samples]
        if self.flip is not None:
            i, pos = self.flip
            out[i].view(torch.int32)[pos] ^= 1  # lowest mantissa bit
        return out

    async def logprobs(self, samples, temperature):
        self.calls.append(("trainer", "logprobs", len(samples)))
        return self._score(samples)

    async def forward_backward(self, batch):
        self.calls.append(("trainer", "forward_backward", len(batch.samples)))
        self.pending = batch
        return self._score(batch.samples)

    async def optimizer_step(self):
        self.calls.append(("trainer", "optimizer_step", 0))
        assert self.pending is not None, "optimizer_step without forward_backward"
        self.batches.append(self.pending)
        self.pending = None
        self.trained_version += 1
        return {"loss": 0.5, "kl": 0.0, "grad_norm": 1.0, "lr": 1e-3, "num_tokens": 10}

    async def drop_gradients(self):
        self.calls.append(("trainer", "drop_gradients", 0))
        self.pending = None

    async def push_weights(self, version):
        self.calls.append(("trainer", "push_weights", version))
        self.weights_version = version

    async def version(self):
        return self.weights_version

    async def fingerprint(self):
        self.calls.append(("trainer", "fingerprint", self.weights_version))
        return fingerprint(fake_weights(self.weights_version), self.weights_version)


class FakeReward:
    def __init__(self, calls: list, runner):
        self.calls, self.runner = calls, runner

    async def score(self, samples):
        self.calls.append(("reward", "score", len(samples)))
        return await self.runner.score(samples)
