"""TrainerActor: one rank of the trainer mesh, a thin Monarch wrapper around `Trainer`.

The logic lives in plain modules that run without Monarch: actors/training.py (the GRPO
step, checkpoints), actors/scorer.py (the policy module, FSDP) and actors/packing.py.
"""

import torch
from monarch.actor import Actor, endpoint

from lockstep.actors.packing import PackedBatch, pack_samples  # noqa: F401  (re-exported)
from lockstep.actors.training import Trainer, TrainerConfig
from lockstep.actors.types import Sample, TrainBatch
from lockstep.models.qwen3.capture import CapturedRun

__all__ = ["TrainerActor", "Trainer", "TrainerConfig", "pack_samples"]


class TrainerActor(Actor):
    """One trainer rank. Every rank gets every call; rank 0's answer is the one to read."""

    def __init__(self, model_cfg, trainer_cfg: TrainerConfig, layout):
        from lockstep.actors.dist import init_distributed

        mesh = init_distributed(layout)
        device = torch.device("cuda", torch.cuda.current_device()) if layout.device_type == "cuda" else torch.device("cpu")
        self.trainer = Trainer(model_cfg, trainer_cfg, device, mesh)

    @endpoint
    async def forward_backward(self, batch: TrainBatch) -> list[torch.Tensor]:
        return self.trainer.forward_backward(batch)

    @endpoint
    async def optimizer_step(self) -> dict[str, float]:
        return self.trainer.optimizer_step()

    @endpoint
    async def drop_gradients(self) -> None:
        self.trainer.drop_gradients()

    @endpoint
    async def logprobs(self, samples: list[Sample], temperature: float) -> list[torch.Tensor]:
        return self.trainer.logprobs(samples, temperature)

    @endpoint
    async def push_weights(self, version: int) -> None:
        await self.trainer.push_weights(version)

    @endpoint
    async def save(self, path: str) -> None:
        self.trainer.save(path)

    @endpoint
    async def load(self, path: str) -> None:
        self.trainer.load(path)

    @endpoint
    async def export_hf(self, path: str) -> None:
        self.trainer.export_hf(path)

    @endpoint
    async def fingerprint(self):
        return self.trainer.fingerprint()

    @endpoint
    async def audit(self, sample: Sample, temperature: float, expected_version: int) -> CapturedRun | None:
        run = self.trainer.audit(sample, temperature, expected_version)
        return run if self.trainer.rank == 0 else None  # rank 0 answers; the others only join FSDP / TP

    @endpoint
    async def version(self) -> int:
        return self.trainer.version
