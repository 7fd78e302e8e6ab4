"""Trainer logic: GRPO steps on TorchTitan's optimizer, LR schedule and FSDP, over lockstep's Qwen3.

Runs without Monarch (one process, or one rank of a gloo/nccl world); actors/trainer.py is its
thin Monarch wrapper. A step is two calls, with the bitwise barrier between them:

    logprobs = trainer.forward_backward(batch)   # training forward + backward of every micro-batch
    ... the controller compares logprobs with the generator's (controller/barrier.py) ...
    trainer.optimizer_step()                      # or drop_gradients(): no weight change, no version bump

so the tokens' logprobs the barrier checks come from the very forward whose gradients the
optimizer applies; there is no separate scoring pass. `logprobs()` (no grad) stays for audits
and ad-hoc scoring.

Data parallel over the trainer mesh's "dp_shard" dim: rank r trains on `samples[r::W]`.
Logprobs are gathered back into sample order on every rank; gradients are summed by FSDP, and
each rank's loss is already divided by the token count of the whole batch, so the sum is the
batch token-mean.

Tensor parallel over its "tp" dim (impl=lockstep): every parameter becomes a DTensor on the tp
mesh, Shard(0) or Replicate() from models/qwen3/sharding.py, and the model runs
models/qwen3/parallelize.py's forwards (TP=1's bits forward; backward see there); FSDP then
shards those DTensors over dp_shard (FSDP x TP, TorchTitan's order: TP first).
"""

import math
import os
import shutil
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import DeviceMesh

from lockstep.actors.grpo import kl_penalty, policy_loss
from lockstep.actors.packing import FILLER, PackedBatch, pack_samples
from lockstep.actors.reward import merge_strided
from lockstep.actors.scorer import Scorer, apply_fsdp, apply_tp, build_scorer
from lockstep.actors.types import Sample, TrainBatch
from lockstep.models.qwen3.capture import Capture, CapturedRun

# The LR schedule is warmup then constant: TorchTitan's schedule wants a total step count,
# and an RL run has no fixed one.
_NO_DECAY_TOTAL_STEPS = 2**40
_OPTIMIZERS = ("AdamW", "Adam")  # what TorchTitan's build_optimizers offers


@dataclass(kw_only=True, slots=True)
class TrainerConfig:
    """Defaults suit the tiny demo model learning arithmetic on CPU."""

    lr: float = 1e-3
    warmup_steps: int = 0
    weight_decay: float = 0.0  # RL fine-tuning: no pull toward zero
    max_grad_norm: float = 1.0
    micro_batch_size: int = 16  # sequences per forward/backward
    clip_eps: float = 0.2
    kl_coef: float = 0.0  # > 0 keeps a frozen copy of the initial weights as reference
    seed: int = 0
    optimizer: str = "AdamW"

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type is float and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"trainer.{f.name}={value!r}: must be a finite number")
        if self.lr <= 0:
            raise ValueError(f"trainer.lr={self.lr}: must be > 0")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"trainer.warmup_steps={self.warmup_steps!r}: must be an int >= 0")
        if self.weight_decay < 0:
            raise ValueError(f"trainer.weight_decay={self.weight_decay}: must be >= 0")
        if self.max_grad_norm <= 0:
            raise ValueError(f"trainer.max_grad_norm={self.max_grad_norm}: must be > 0")
        if not isinstance(self.micro_batch_size, int) or self.micro_batch_size < 1:
            raise ValueError(f"trainer.micro_batch_size={self.micro_batch_size!r}: must be an int >= 1")
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"trainer.clip_eps={self.clip_eps}: must be in (0, 1)")
        if self.kl_coef < 0:
            raise ValueError(f"trainer.kl_coef={self.kl_coef}: must be >= 0")
        if not isinstance(self.seed, int):
            raise ValueError(f"trainer.seed={self.seed!r}: must be an int")
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"trainer.optimizer={self.optimizer!r}: must be one of {list(_OPTIMIZERS)}")


@dataclass
class _PendingStep:
    """What forward_backward leaves for optimizer_step: the gradients sit in the parameters."""

    num_tokens: int  # completion tokens of the whole batch, all ranks
    lr: float
    sums: torch.Tensor  # float64 [4] on the device: policy loss, kl, num_clipped, ratio sum
    ratio_max: torch.Tensor  # float64 [] on the device


class _TrainState(Stateful):
    """Step, version and the RNG. Every rank seeds and draws alike, so rank 0's RNG (the one
    DCP keeps of a replicated tensor) restores them all."""

    def __init__(self, trainer: "Trainer"):
        self.trainer = trainer

    def state_dict(self):
        state = {"step": torch.tensor(self.trainer.step), "version": torch.tensor(self.trainer.version),
                 "rng": torch.get_rng_state()}
        if self.trainer.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.trainer.device)
        return state

    def load_state_dict(self, state_dict):
        self.trainer.step = int(state_dict["step"])
        self.trainer.version = int(state_dict["version"])
        torch.set_rng_state(state_dict["rng"])
        if "cuda_rng" in state_dict:
            torch.cuda.set_rng_state(state_dict["cuda_rng"], self.trainer.device)


class Trainer:
    """GRPO on one policy. `mesh`: the trainer DeviceMesh ("dp_shard", "tp"), None = one process."""

    def __init__(self, model_cfg, cfg: TrainerConfig, device: torch.device | str = "cpu",
                 mesh: DeviceMesh | None = None):
        from torchtitan.components.lr_scheduler import build_lr_schedulers
        from torchtitan.components.optimizer import build_optimizers
        from torchtitan.config import LRScheduler as LRSchedulerConfig
        from torchtitan.config import Optimizer as OptimizerConfig
        from torchtitan.distributed import ParallelDims

        self.model_cfg, self.cfg = model_cfg, cfg
        self.device = torch.device(device)
        self.dp_mesh, self.dp_rank, self.dp_size = None, 0, 1
        self.tp_mesh, self.tp_size, self.rank, self.world_size = None, 1, 0, 1
        if mesh is not None:
            self.dp_mesh = mesh["dp_shard"] if mesh.ndim > 1 else mesh
            self.dp_rank, self.dp_size = self.dp_mesh.get_local_rank(), self.dp_mesh.size()
            if "tp" in (mesh.mesh_dim_names or ()) and mesh["tp"].size() > 1:
                self.tp_mesh, self.tp_size = mesh["tp"], mesh["tp"].size()
                if model_cfg.impl != "lockstep":
                    raise ValueError(f"trainer tp={self.tp_size} runs lockstep's Qwen3 only; "
                                     "set model.impl=lockstep or the trainer layout's tp=1")
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.step, self.version = 0, 0
        self._pending: _PendingStep | None = None

        torch.manual_seed(cfg.seed)
        self.scorer = build_scorer(model_cfg, self.device)
        self.ref_scorer = None
        if cfg.kl_coef > 0:
            self.ref_scorer = build_scorer(model_cfg, self.device).requires_grad_(False)
        if self.tp_size > 1:
            for scorer in (self.scorer, self.ref_scorer):
                if scorer is not None:
                    apply_tp(scorer, self.tp_mesh)
        if self.dp_size > 1:
            apply_fsdp(self.scorer, self.dp_mesh)
            if self.ref_scorer is not None:
                apply_fsdp(self.ref_scorer, self.dp_mesh)

        parallel_dims = ParallelDims(dp_replicate=1, dp_shard=self.dp_size, cp=1, tp=self.tp_size, pp=1, ep=1,
                                     etp=1, world_size=self.dp_size * self.tp_size)
        self.optimizers = build_optimizers(
            [self.scorer],
            OptimizerConfig(name=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                            implementation="foreach"),
            parallel_dims,
        )
        self.lr_schedulers = build_lr_schedulers(
            self.optimizers,
            LRSchedulerConfig(warmup_steps=cfg.warmup_steps, total_steps=_NO_DECAY_TOTAL_STEPS, decay_ratio=0.0),
            _NO_DECAY_TOTAL_STEPS,
        )

    # -- scoring --

    def _micro_batches(self, samples: list) -> list[list]:
        """This rank's share in micro-batches; [] entries pad every rank to the same count."""
        mbs = self.cfg.micro_batch_size
        mine = samples[self.dp_rank :: self.dp_size]
        num_per_rank = -(-len(samples) // self.dp_size)
        num_micro_batches = -(-num_per_rank // mbs)
        return [mine[i * mbs : (i + 1) * mbs] for i in range(num_micro_batches)]

    def _score(self, scorer: Scorer, chunk: list[Sample], temperature: float) -> tuple[torch.Tensor, PackedBatch]:
        packed = (pack_samples(chunk) if chunk else FILLER).to(self.device)
        return scorer.score(packed, temperature), packed

    @torch.no_grad()
    def logprobs(self, samples: list[Sample], temperature: float) -> list[torch.Tensor]:
        """fp32 [len(completion_ids)] per sample (CPU), in sample order, on every rank.
        Not part of the step (forward_backward returns the same bits); for audits and ad-hoc use."""
        check_temperature(temperature)
        mine: list[torch.Tensor] = []
        for chunk in self._micro_batches(samples):
            lp, packed = self._score(self.scorer, chunk, temperature)
            if chunk:
                mine.extend(t.cpu().clone() for t in lp.split(packed.num_targets))
        return self._gather_strided(mine)

    @torch.no_grad()
    def audit(self, sample: Sample, temperature: float, expected_version: int) -> CapturedRun:
        """Score one sample alone with every module's per-token outputs recorded (the
        divergence audit). Every rank must call it: FSDP gathers the weights for the forward."""
        check_temperature(temperature)
        if self.model_cfg.impl != "lockstep":
            raise ValueError("the audit records lockstep's Qwen3 on both sides; it needs model.impl=lockstep")
        if self.tp_size > 1:
            raise ValueError(
                f"the audit records whole module outputs and this trainer is tensor-parallel (tp={self.tp_size}): "
                "run `lockstep audit --run LOG_DIR --mesh local-cpu` (or another tp=1 mesh)"
            )
        if expected_version != self.version:
            raise RuntimeError(
                f"the trainer holds weights v{self.version}, the audited sample was made with v{expected_version}; "
                "load the checkpoint of that version first"
            )
        packed = pack_samples([sample]).to(self.device)
        logits_positions = packed.positions[packed.target_index]  # [N], the rows lm_head sees
        with Capture(self.scorer.model, logits_positions=logits_positions) as capture:
            logprobs = self.scorer.score(packed, temperature)
        return CapturedRun(
            prompt_ids=list(sample.prompt_ids),
            completion_ids=list(sample.completion_ids),
            logprobs=logprobs.cpu().clone(),
            activations=capture.activations(),
        )

    def _gather_strided(self, mine: list) -> list:
        if self.dp_size == 1:
            return mine
        per_rank: list = [None] * self.dp_size
        dist.all_gather_object(per_rank, mine, group=self.dp_mesh.get_group())
        return merge_strided(per_rank)

    # -- training --

    def forward_backward(self, batch: TrainBatch) -> list[torch.Tensor]:
        """Training forward and backward of every micro-batch; the gradients accumulate and wait
        for optimizer_step() or drop_gradients(). Returns the sampled tokens' fp32 logprobs from
        that forward, [len(completion_ids)] per sample (CPU), in sample order on every rank: the
        trainer's side of the barrier."""
        samples, temperature = batch.samples, batch.temperature
        check_temperature(temperature)
        self._check_batch(samples)
        num_tokens = sum(len(s.completion_ids) for s in samples)  # the whole batch, all ranks
        lr = self.lr_schedulers.schedulers[0].get_last_lr()[0]

        self._pending = None
        self.optimizers.zero_grad()
        # float64, on the device (NCCL reduces device tensors only):
        # sums of policy loss, kl, num_clipped, ratio; and the max ratio
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        ratio_max = torch.zeros((), dtype=torch.float64, device=self.device)
        mine, num_targets = [], []  # detached logprobs of this rank's samples, one device copy at the end
        for chunk in self._micro_batches(samples):
            lp, packed = self._score(self.scorer, chunk, temperature)  # [n] with grad
            ref_lp = None
            if self.ref_scorer is not None:
                with torch.no_grad():
                    ref_lp, _ = self._score(self.ref_scorer, chunk, temperature)
            if not chunk:
                (lp.sum() * 0.0).backward()  # joins the FSDP reduce-scatter with zero grads
                continue
            mine.append(lp.detach())
            num_targets.extend(packed.num_targets)
            old = torch.cat([s.logprobs.float() for s in chunk]).to(self.device)
            advantages = torch.tensor(
                [s.advantage for s in chunk for _ in s.completion_ids], dtype=torch.float32, device=self.device
            )
            loss, stats = policy_loss(lp, old, advantages, num_tokens, self.cfg.clip_eps)
            sums[0] += loss.detach().double()
            if ref_lp is not None:
                kl = kl_penalty(lp, ref_lp).sum() / num_tokens
                loss = loss + self.cfg.kl_coef * kl
                sums[1] += kl.detach().double()
            loss.backward()
            sums[2] += stats["num_clipped"]
            sums[3] += stats["ratio_sum"]
            ratio_max = torch.maximum(ratio_max, stats["ratio_max"].double())

        self._pending = _PendingStep(num_tokens=num_tokens, lr=lr, sums=sums, ratio_max=ratio_max)
        logprobs = list(torch.cat(mine).cpu().split(num_targets)) if mine else []
        return self._gather_strided(logprobs)

    def optimizer_step(self) -> dict[str, float]:
        """Apply the pending gradients: one optimizer step, version += 1. Returns rank-reduced metrics."""
        pending = self._pending
        if pending is None:
            raise RuntimeError("optimizer_step: no gradients are pending; call forward_backward(batch) first")
        self._pending = None
        from torchtitan.distributed.utils import clip_grad_norm_

        grad_norm = clip_grad_norm_(self.scorer.parameters(), self.cfg.max_grad_norm)
        if not torch.isfinite(grad_norm):
            self.optimizers.zero_grad()
            raise RuntimeError(f"train step {self.step}: gradient norm is {grad_norm.item()}; weights left unchanged")
        self.optimizers.step()
        self.lr_schedulers.step()
        self.optimizers.zero_grad()  # the gradients are spent; free them until the next step
        self.step += 1
        self.version += 1

        sums, ratio_max, num_tokens = pending.sums, pending.ratio_max, pending.num_tokens
        if self.dp_size > 1:
            group = self.dp_mesh.get_group()
            dist.all_reduce(sums, group=group)
            dist.all_reduce(ratio_max, op=dist.ReduceOp.MAX, group=group)
        pg_loss, kl, num_clipped, ratio_sum = sums.tolist()
        return {
            "loss": pg_loss + self.cfg.kl_coef * kl,
            "pg_loss": pg_loss,
            "kl": kl,
            "grad_norm": grad_norm.item(),
            "lr": pending.lr,
            "num_tokens": float(num_tokens),
            "clip_frac": num_clipped / num_tokens,
            "ratio_mean": ratio_sum / num_tokens,
            "ratio_max": ratio_max.item(),
            "version": float(self.version),
        }

    def drop_gradients(self) -> None:
        """Discard the pending gradients (the barrier refused the step): weights, optimizer
        state, LR schedule and version stay as they were."""
        self._pending = None
        self.optimizers.zero_grad()

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """forward_backward then optimizer_step, with no barrier between (tests, benchmarks)."""
        self.forward_backward(batch)
        return self.optimizer_step()

    def _check_batch(self, samples: list[Sample]) -> None:
        if not samples or not any(s.completion_ids for s in samples):
            raise ValueError("train step: the batch has no completion tokens")
        for i, s in enumerate(samples):
            if s.advantage is None:
                raise ValueError(f"train step: sample {i} has no advantage; run grpo.assign_advantages first")
            if s.logprobs.shape != (len(s.completion_ids),):
                raise ValueError(
                    f"train step: sample {i} logprobs shape {tuple(s.logprobs.shape)} != "
                    f"({len(s.completion_ids)},) completion tokens"
                )
            if s.policy_version != self.version:
                raise ValueError(
                    f"train step: sample {i} was generated with weights v{s.policy_version}, the trainer "
                    f"is at v{self.version}; push the weights and regenerate (on-policy only)"
                )

    # -- weights and checkpoints --

    async def push_weights(self, version: int) -> None:
        """Publish the current weights (HF names) under `version`, which must be ours."""
        if version != self.version:
            raise ValueError(f"push_weights({version}): the trainer's weights are at version {self.version}")
        from lockstep.actors.weight_sync import push_state_dict

        await push_state_dict(self.scorer.hf_state_dict(), version)

    def _checkpoint_state(self) -> dict:
        from torchtitan.components.checkpoint import ModelWrapper

        return {
            "model": ModelWrapper(self.scorer),
            "optimizer": self.optimizers,
            "lr_scheduler": self.lr_schedulers,
            "train_state": _TrainState(self),
        }

    def save(self, path: str) -> None:
        """DCP checkpoint of weights, optimizer, LR schedule, step, version and RNG into `path`.

        A directory there is replaced. Not atomic on its own: the controller writes whole
        checkpoints into a staging directory and renames it into place
        (lockstep.controller.checkpoint).
        """
        path = os.path.abspath(path)
        if self.rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        self._barrier()
        dcp.save(self._checkpoint_state(), checkpoint_id=path, **self._dcp_group())
        self._barrier()

    def export_hf(self, path: str) -> None:
        """The weights as HF safetensors, `path/model.safetensors` (rank 0 writes; every rank
        must call: FSDP shards are gathered one tensor at a time)."""
        from safetensors.torch import save_file
        from torch.distributed.tensor import DTensor

        full = {}
        for name, tensor in self.scorer.hf_state_dict().items():
            tensor = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
            if self.rank == 0:
                full[name] = tensor.detach().to("cpu", copy=True).contiguous()
        if self.rank == 0:
            os.makedirs(path, exist_ok=True)
            save_file(full, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        self._barrier()

    def fingerprint(self):
        """Layout-independent fingerprint of the weights (every rank must call: a collective)."""
        from lockstep.actors.weight_sync import fingerprint

        return fingerprint(self.scorer.hf_state_dict(), self.version)

    def load(self, path: str) -> None:
        path = os.path.abspath(path)
        if not os.path.isfile(os.path.join(path, ".metadata")):
            raise ValueError(f"no trainer checkpoint at {path} (no .metadata): pass a dir written by save()")
        self.drop_gradients()
        dcp.load(self._checkpoint_state(), checkpoint_id=path, **self._dcp_group())

    def _dcp_group(self) -> dict:
        if self.world_size == 1:
            return {"no_dist": True}
        return {"process_group": None}  # the trainer's world: dp_shard x tp

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature!r}: must be > 0 (the generator's sampling temperature)")
