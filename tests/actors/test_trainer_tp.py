"""Trainer tensor parallelism (gloo procs): tp=2, and FSDP 2 x tp=2. The training forward's
logprobs are TP=1's bits, and so is every gradient at dp=1 (FSDP's sum over its ranks is
another order, as without TP); the backward repeats bit for bit, the weights
fingerprint like TP=1's, and they pack for the weight push and survive a checkpoint. Each
proc also runs the TP=1 trainer, so the check is local."""

import os

import pytest
import torch
import torch.distributed as dist

from lockstep.actors.grpo import assign_advantages
from lockstep.actors.trainer import Trainer, TrainerConfig
from lockstep.actors.types import TrainBatch
from lockstep.models import ModelConfig
from lockstep.models.tiny import write_tiny_checkpoint

from test_trainer import TEMPERATURE, _free_port, make_samples

# GQA 4/2, each rank's share of every split dim a multiple of 32 (kernels.TILE_K).
SHAPE = dict(vocab="ascii", vocab_size=128, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=32,
             intermediate_size=128)
CFG = TrainerConfig(lr=1e-2, micro_batch_size=4)


def _grads(trainer) -> dict[str, torch.Tensor]:
    """Full gradients (a collective for DTensors: every rank calls)."""
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
            for n, p in trainer.scorer.model.named_parameters()}


def _worker(rank, world_size, port, model_cfg, out_dir, dp=1):
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        single = Trainer(model_cfg, CFG)
        samples = make_samples(num_prompts=3, num_per_prompt=2, vocab_size=128)
        for s, lp in zip(samples, single.logprobs(samples, TEMPERATURE)):
            s.logprobs = lp
        for s, reward in zip(samples, [1.0, 0.0, 0.5, 1.0, 0.0, 0.2]):
            s.reward = reward
        assign_advantages(samples)
        batch = TrainBatch(samples=samples, temperature=TEMPERATURE)
        want_logprobs = single.forward_backward(batch)
        want_grads = _grads(single)

        mesh = init_device_mesh("cpu", (dp, world_size // dp), mesh_dim_names=("dp_shard", "tp"))
        trainer = Trainer(model_cfg, CFG, "cpu", mesh)
        logprobs = trainer.forward_backward(batch)
        assert all(torch.equal(x, y) for x, y in zip(logprobs, want_logprobs)), "TP=2 logprobs differ from TP=1"
        grads = _grads(trainer)
        for name, grad in grads.items():  # FSDP sums its ranks' gradients: TP=1's bits need dp=1
            assert dp > 1 or torch.equal(grad, want_grads[name]), f"the gradient of {name} differs from TP=1's"
        trainer.drop_gradients()
        assert all(torch.equal(x, y) for x, y in zip(trainer.forward_backward(batch), want_logprobs))
        assert all(torch.equal(g, _grads(trainer)[n]) for n, g in grads.items()), "the TP backward did not repeat"
        fingerprint = trainer.fingerprint()
        assert fingerprint.first_difference(single.fingerprint()) is None
        from lockstep.actors import weight_pack

        _, blocks = weight_pack.pack(trainer.scorer.hf_state_dict(), rank)  # what push_weights publishes
        assert blocks or rank % 2, "a tp coordinate-0 rank publishes blocks"
        metrics = trainer.optimizer_step()
        assert metrics["version"] == 1.0 and metrics["num_tokens"] == sum(len(s.completion_ids) for s in samples)
        after = trainer.logprobs(samples, TEMPERATURE)
        trainer.save(os.path.join(out_dir, "ckpt"))
        restored = Trainer(model_cfg, CFG, "cpu", mesh)
        restored.load(os.path.join(out_dir, "ckpt"))
        assert all(torch.equal(x, y) for x, y in zip(restored.logprobs(samples, TEMPERATURE), after))
        with open(os.path.join(out_dir, f"ok{rank}"), "w"):
            pass
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp_model_cfg(tmp_path_factory):
    return ModelConfig(path=str(write_tiny_checkpoint(tmp_path_factory.mktemp("tp"), **SHAPE)))


@pytest.mark.slow  # spawned procs import torch + TorchTitan: ~40 s (2 procs) to ~80 s (4) on 2 loaded cores
@pytest.mark.parametrize("dp, world_size", [(1, 2), (2, 4)], ids=["tp2", "fsdp2xtp2"])
def test_trainer_tp_forward_backward_is_tp1s_bits(tp_model_cfg, tmp_path, dp, world_size, spawn):
    spawn(_worker, (world_size, _free_port(), tp_model_cfg, str(tmp_path), dp), world_size)
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("ok")) == [f"ok{r}" for r in range(world_size)]


def test_trainer_tp_needs_the_lockstep_model_and_dividing_kv_heads(tp_model_cfg):
    from lockstep.models.qwen3 import Qwen3Config
    from lockstep.models.qwen3.sharding import check_tp

    with pytest.raises(ValueError, match="trainer layout tp=4 does not split the model's num_kv_heads=2"):
        check_tp(Qwen3Config.from_hf(tp_model_cfg.path), 4, field="trainer layout tp", trainer=True)
