"""Trainer: GRPO steps on TorchTitan's optimizer, LR schedule and FSDP, over lockstep's Qwen3.

`Trainer` holds the logic and runs without Monarch (one process, or one rank of a gloo/nccl
world); `TrainerActor` is its thin Monarch wrapper. Samples are packed into one flat token
stream with varlen attention (no padding), and every completion token's logprob comes from
`token_logprobs_packed`: lm_head on the rows that predict it, then `kernels.token_logprobs`,
the same calls the generator makes, so the barrier can compare bits.

Data parallel over the trainer mesh's "dp_shard" dim: rank r scores / trains on
`samples[r::W]`. Logprobs are gathered back into sample order on every rank; gradients are
summed by FSDP, and each rank's loss is already divided by the token count of the whole batch,
so the sum is the batch token-mean.
"""

import math
import os
import shutil
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import DeviceMesh
from monarch.actor import Actor, endpoint

from lockstep.actors.grpo import kl_penalty, policy_loss
from lockstep.actors.reward import merge_strided
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


# --- packing -----------------------------------------------------------------------------


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
    """Completion token j of a sample sits at row start + len(prompt) + j and is predicted by
    the row before it, so its logprob is read from the logits of row start + len(prompt) + j - 1.
    """
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
_FILLER = pack_samples(
    [Sample(prompt_index=-1, prompt="", completion="", prompt_ids=[0], completion_ids=[0],
            logprobs=torch.zeros(1), policy_version=-1)]
)


# --- models ------------------------------------------------------------------------------


class _Scorer(nn.Module):
    """Root module: one forward from packed tokens to fp32 logprobs [N].

    lm_head runs inside this forward, so under FSDP the root group (embedding, final norm,
    lm_head; one group because Qwen3 ties the embedding to lm_head) is gathered around it.
    """

    def __init__(self, model: nn.Module, impl: str, config):
        super().__init__()
        self.model = model
        self.impl = impl
        self.config = config  # lockstep.models.qwen3.Qwen3Config

    def forward(self, tokens, positions, cu_seqlens, target_index, target_ids, temperature: float):
        from lockstep import kernels

        if self.impl == "lockstep":
            from lockstep.models.qwen3 import token_logprobs_packed

            return token_logprobs_packed(
                self.model, tokens, positions, cu_seqlens, target_index, target_ids, temperature
            )
        # TorchTitan's Qwen3 takes [B, S]: right-pad each sample into its own row (causal
        # attention never reads the padding to the right of a token).
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()  # [B]
        seq_of_row = torch.repeat_interleave(torch.arange(len(lengths), device=tokens.device), lengths)
        col_of_row = torch.arange(tokens.numel(), device=tokens.device) - cu_seqlens[:-1].long()[seq_of_row]
        padded = tokens.new_zeros(len(lengths), int(lengths.max()))  # [B, S]
        padded[seq_of_row, col_of_row] = tokens
        logits = self.model(padded)  # [B, S, V]
        picked = logits[seq_of_row[target_index], col_of_row[target_index]].float()  # [N, V]
        return kernels.token_logprobs(picked, target_ids, temperature)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Current weights under HF names (DTensor shards under FSDP)."""
        from lockstep.models.qwen3.state_dict_adapter import to_hf

        return to_hf(self.model.state_dict(), self.config)

    def score(self, packed: PackedBatch, temperature: float) -> torch.Tensor:
        return self(packed.tokens, packed.positions, packed.cu_seqlens, packed.target_index,
                    packed.target_ids, temperature)


def build_scorer(model_cfg, device: torch.device) -> _Scorer:
    """The policy from `model_cfg.path` (a HF checkpoint dir; empty = tiny), wrapped for scoring."""
    if model_cfg.impl == "lockstep":
        from lockstep.models import build_model

        model = build_model(model_cfg, device)
        return _Scorer(model, "lockstep", model.config)
    if model_cfg.impl == "stock":
        from torchtitan.models.qwen3 import Qwen3Model as TitanQwen3Model

        from lockstep.models import checkpoint_path
        from lockstep.models.qwen3 import Qwen3Config
        from lockstep.models.qwen3.state_dict_adapter import from_hf, read_safetensors, titan_model_args

        path = checkpoint_path(model_cfg)
        config = Qwen3Config.from_hf(path)
        with torch.device("meta"):
            model = TitanQwen3Model(titan_model_args(config))
        # Allocate without random init; to_empty unties a tied lm_head, so tie again.
        model = model.to_empty(device=device).to(model_cfg.torch_dtype)
        if config.tie_word_embeddings:
            model.output.weight = model.tok_embeddings.weight
        with torch.device(device):
            model.rope_cache = model._precompute_rope_cache()  # fp32, as TorchTitan keeps it
        model.load_state_dict(from_hf(read_safetensors(path), config), strict=True)
        return _Scorer(model, "stock", config)
    raise ValueError(f"model.impl={model_cfg.impl!r}: must be 'lockstep' or 'stock'")


def apply_fsdp(scorer: _Scorer, dp_mesh: DeviceMesh) -> None:
    """FSDP2 the TorchTitan way (one group per block, gradient division left to the loss).

    Unlike TorchTitan's apply_fsdp, the embedding, final norm and lm_head stay in the root
    group: sharding the embedding and lm_head apart would untie a tied lm_head.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    from torchtitan.models.llama3.infra.parallelize import disable_fsdp_gradient_division

    # Parameters keep the checkpoint dtype end to end: the generator runs that dtype too.
    fsdp_config = {"mesh": dp_mesh, "mp_policy": MixedPrecisionPolicy()}
    for block in scorer.model.layers.values():
        fully_shard(block, **fsdp_config, reshard_after_forward=True)
    fully_shard(scorer, **fsdp_config)
    disable_fsdp_gradient_division(scorer)
    # A divide factor of 1 needs no PREMUL_SUM, which gloo lacks: plain SUM everywhere.
    for module in scorer.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)


# --- the trainer -------------------------------------------------------------------------


class _TrainState(Stateful):
    def __init__(self, trainer: "Trainer"):
        self.trainer = trainer

    def state_dict(self):
        return {"step": torch.tensor(self.trainer.step), "version": torch.tensor(self.trainer.version)}

    def load_state_dict(self, state_dict):
        self.trainer.step = int(state_dict["step"])
        self.trainer.version = int(state_dict["version"])


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
        if mesh is not None:
            if "tp" in (mesh.mesh_dim_names or ()) and mesh["tp"].size() > 1:
                raise NotImplementedError(
                    f"trainer tensor parallelism is not supported yet (tp={mesh['tp'].size()}): "
                    "set the trainer layout to tp=1 and scale with dp_shard (FSDP)"
                )
            self.dp_mesh = mesh["dp_shard"] if mesh.ndim > 1 else mesh
            self.dp_rank, self.dp_size = self.dp_mesh.get_local_rank(), self.dp_mesh.size()
        self.step, self.version = 0, 0

        torch.manual_seed(cfg.seed)
        self.scorer = build_scorer(model_cfg, self.device)
        self.ref_scorer = None
        if cfg.kl_coef > 0:
            self.ref_scorer = build_scorer(model_cfg, self.device).requires_grad_(False)
        if self.dp_size > 1:
            apply_fsdp(self.scorer, self.dp_mesh)
            if self.ref_scorer is not None:
                apply_fsdp(self.ref_scorer, self.dp_mesh)

        parallel_dims = ParallelDims(dp_replicate=1, dp_shard=self.dp_size, cp=1, tp=1, pp=1, ep=1,
                                     etp=1, world_size=self.dp_size)
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

    def _score(self, scorer: _Scorer, chunk: list[Sample], temperature: float) -> tuple[torch.Tensor, PackedBatch]:
        packed = (pack_samples(chunk) if chunk else _FILLER).to(self.device)
        return scorer.score(packed, temperature), packed

    @torch.no_grad()
    def logprobs(self, samples: list[Sample], temperature: float) -> list[torch.Tensor]:
        """fp32 [len(completion_ids)] per sample (CPU), in sample order, on every rank."""
        _check_temperature(temperature)
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
        _check_temperature(temperature)
        if self.model_cfg.impl != "lockstep":
            raise ValueError("the audit records lockstep's Qwen3 on both sides; it needs model.impl=lockstep")
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

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step on the batch; version += 1. Returns rank-reduced metrics."""
        samples, temperature = batch.samples, batch.temperature
        _check_temperature(temperature)
        self._check_batch(samples)
        num_tokens = sum(len(s.completion_ids) for s in samples)  # the whole batch, all ranks
        lr = self.lr_schedulers.schedulers[0].get_last_lr()[0]

        self.optimizers.zero_grad()
        # float64, on the device (NCCL reduces device tensors only):
        # sums of policy loss, kl, num_clipped, ratio; and the max ratio
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        ratio_max = torch.zeros((), dtype=torch.float64, device=self.device)
        for chunk in self._micro_batches(samples):
            lp, packed = self._score(self.scorer, chunk, temperature)  # [n] with grad
            ref_lp = None
            if self.ref_scorer is not None:
                with torch.no_grad():
                    ref_lp, _ = self._score(self.ref_scorer, chunk, temperature)
            if not chunk:
                (lp.sum() * 0.0).backward()  # joins the FSDP reduce-scatter with zero grads
                continue
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

        from torchtitan.distributed.utils import clip_grad_norm_

        grad_norm = clip_grad_norm_(self.scorer.parameters(), self.cfg.max_grad_norm)
        if not torch.isfinite(grad_norm):
            self.optimizers.zero_grad()
            raise RuntimeError(f"train_step {self.step}: gradient norm is {grad_norm.item()}; weights left unchanged")
        self.optimizers.step()
        self.lr_schedulers.step()
        self.step += 1
        self.version += 1

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
            "lr": lr,
            "num_tokens": float(num_tokens),
            "clip_frac": num_clipped / num_tokens,
            "ratio_mean": ratio_sum / num_tokens,
            "ratio_max": ratio_max.item(),
            "version": float(self.version),
        }

    def _check_batch(self, samples: list[Sample]) -> None:
        if not samples or not any(s.completion_ids for s in samples):
            raise ValueError("train_step: the batch has no completion tokens")
        for i, s in enumerate(samples):
            if s.advantage is None:
                raise ValueError(f"train_step: sample {i} has no advantage; run grpo.assign_advantages first")
            if s.logprobs.shape != (len(s.completion_ids),):
                raise ValueError(
                    f"train_step: sample {i} logprobs shape {tuple(s.logprobs.shape)} != "
                    f"({len(s.completion_ids)},) completion tokens"
                )
            if s.policy_version != self.version:
                raise ValueError(
                    f"train_step: sample {i} was generated with weights v{s.policy_version}, the trainer "
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
        """DCP checkpoint of weights, optimizer, LR schedule, step and version.

        Written to `path.tmp` and swapped in only when complete, so `path` always holds a
        whole checkpoint (the old one until the new one is done).
        """
        path = os.path.abspath(path)
        tmp, old = path + ".tmp", path + ".old"
        if self.dp_rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        self._barrier()
        dcp.save(self._checkpoint_state(), checkpoint_id=tmp, **self._dcp_group())
        self._barrier()
        if self.dp_rank == 0:
            shutil.rmtree(old, ignore_errors=True)
            if os.path.exists(path):
                os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        self._barrier()

    def load(self, path: str) -> None:
        path = os.path.abspath(path)
        if not os.path.isfile(os.path.join(path, ".metadata")):
            raise ValueError(f"no trainer checkpoint at {path} (no .metadata): pass a dir written by save()")
        dcp.load(self._checkpoint_state(), checkpoint_id=path, **self._dcp_group())

    def _dcp_group(self) -> dict:
        if self.dp_size == 1:
            return {"no_dist": True}
        return {"process_group": self.dp_mesh.get_group()}

    def _barrier(self) -> None:
        if self.dp_size > 1:
            dist.barrier(group=self.dp_mesh.get_group())


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature!r}: must be > 0 (the generator's sampling temperature)")


# --- the actor ---------------------------------------------------------------------------

class TrainerActor(Actor):
    """One trainer rank. Every rank gets every call; rank 0's answer is the one to read."""

    def __init__(self, model_cfg, trainer_cfg: TrainerConfig, layout):
        from lockstep.actors.dist import init_distributed

        mesh = init_distributed(layout)
        device = torch.device("cuda", torch.cuda.current_device()) if layout.device_type == "cuda" else torch.device("cpu")
        self.trainer = Trainer(model_cfg, trainer_cfg, device, mesh)

    @endpoint
    async def logprobs(self, samples: list[Sample], temperature: float) -> list[torch.Tensor]:
        return self.trainer.logprobs(samples, temperature)

    @endpoint
    async def train_step(self, batch: TrainBatch) -> dict[str, float]:
        return self.trainer.train_step(batch)

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
    async def audit(self, sample: Sample, temperature: float, expected_version: int) -> CapturedRun | None:
        run = self.trainer.audit(sample, temperature, expected_version)
        return run if self.trainer.dp_rank == 0 else None  # rank 0 answers; the others only join FSDP

    @endpoint
    async def version(self) -> int:
        return self.trainer.version
