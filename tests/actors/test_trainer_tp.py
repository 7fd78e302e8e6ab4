"""Trainer tensor parallelism (2 gloo procs, tp=2): the training forward's logprobs and every
gradient are TP=1's bits (a rank's rows of them), the backward repeats bit for bit, and the
weights fingerprint like TP=1's. Each proc also runs the TP=1 trainer, so the check is local."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lockstep.actors.grpo import assign_advantages
from lockstep.actors.trainer import Trainer, TrainerConfig
from lockstep.actors.types import TrainBatch
from lockstep.models import ModelConfig
from lockstep.models.qwen3 import tp_shard
from lockstep.models.tiny import write_tiny_checkpoint

from test_trainer import TEMPERATURE, _free_port, make_samples

# GQA 4/2, each rank's share of every split dim a multiple of 32 (kernels.TILE_K).
SHAPE = dict(vocab="ascii", vocab_size=128, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=32,
             intermediate_size=128)
CFG = TrainerConfig(lr=1e-2, micro_batch_size=4)


def _grads(trainer) -> dict[str, torch.Tensor]:
    return {n: (p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad).clone()
            for n, p in trainer.scorer.model.named_parameters()}


def _worker(rank, world_size, port, model_cfg, out_dir):
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

        mesh = init_device_mesh("cpu", (1, world_size), mesh_dim_names=("dp_shard", "tp"))
        trainer = Trainer(model_cfg, CFG, "cpu", mesh)
        logprobs = trainer.forward_backward(batch)
        assert all(torch.equal(x, y) for x, y in zip(logprobs, want_logprobs)), "TP=2 logprobs differ from TP=1"
        grads = _grads(trainer)
        num_kv = trainer.scorer.config.num_kv_heads
        for name, grad in grads.items():
            assert torch.equal(grad, tp_shard(name, want_grads[name], rank, world_size, num_kv)), name
        trainer.drop_gradients()
        assert all(torch.equal(x, y) for x, y in zip(trainer.forward_backward(batch), want_logprobs))
        assert all(torch.equal(g, _grads(trainer)[n]) for n, g in grads.items()), "the TP backward did not repeat"
        fingerprint = trainer.fingerprint()
        assert fingerprint.first_difference(single.fingerprint()) is None
        metrics = trainer.optimizer_step()
        assert metrics["version"] == 1.0 and metrics["num_tokens"] == sum(len(s.completion_ids) for s in samples)
        with open(os.path.join(out_dir, f"ok{rank}"), "w"):
            pass
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp_model_cfg(tmp_path_factory):
    return ModelConfig(path=str(write_tiny_checkpoint(tmp_path_factory.mktemp("tp"), **SHAPE)))


@pytest.mark.slow  # two spawned procs import torch + TorchTitan: ~40 s on 2 loaded cores
def test_trainer_tp2_forward_backward_is_tp1s_bits(tp_model_cfg, tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), tp_model_cfg, str(tmp_path)), nprocs=2, join=True)
    assert sorted(os.listdir(tmp_path)) == ["ok0", "ok1"]


def test_trainer_tp_needs_the_lockstep_model_and_dividing_kv_heads(tp_model_cfg):
    from lockstep.models.qwen3 import Qwen3Config
    from lockstep.models.qwen3.sharding import check_tp

    with pytest.raises(ValueError, match="trainer layout tp=4 does not split the model's num_kv_heads=2"):
        check_tp(Qwen3Config.from_hf(tp_model_cfg.path), 4, field="trainer layout tp", trainer=True)
