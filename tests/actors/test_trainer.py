import asyncio
import dataclasses
import os
import socket

import pytest
import torch

from lockstep.actors.grpo import assign_advantages
from lockstep.actors.trainer import Trainer, TrainerConfig, pack_samples
from lockstep.actors.types import Sample, TrainBatch
from lockstep.models import ModelConfig
from lockstep.models.tiny import write_tiny_checkpoint

TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def model_cfg(tmp_path_factory):
    return ModelConfig(path=str(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))))


def make_samples(num_prompts=3, num_per_prompt=2, seed=0, vocab_size=24):
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for p in range(num_prompts):
        prompt_ids = torch.randint(0, vocab_size, (int(torch.randint(2, 9, (1,), generator=gen)),), generator=gen)
        for _ in range(num_per_prompt):
            num_completion = int(torch.randint(1, 7, (1,), generator=gen))
            completion_ids = torch.randint(0, vocab_size, (num_completion,), generator=gen)
            samples.append(Sample(
                prompt_index=p, prompt="", completion="", prompt_ids=prompt_ids.tolist(),
                completion_ids=completion_ids.tolist(), logprobs=torch.zeros(num_completion),
                policy_version=0,
            ))
    return samples


def on_policy(trainer, samples, rewards=None):
    """Fill logprobs/version as the generator would, and rewards -> advantages."""
    for s, lp in zip(samples, trainer.logprobs(samples, TEMPERATURE)):
        s.logprobs, s.policy_version = lp, trainer.version
    if rewards is not None:
        for s, r in zip(samples, rewards):
            s.reward = r
        assign_advantages(samples)
    return samples


def test_config_validation():
    TrainerConfig()
    for bad in ({"lr": 0.0}, {"micro_batch_size": 0}, {"clip_eps": 1.5}, {"kl_coef": -1.0},
                {"optimizer": "SGD"}, {"max_grad_norm": float("nan")}, {"warmup_steps": -1}):
        with pytest.raises(ValueError, match=f"trainer.{next(iter(bad))}"):
            TrainerConfig(**bad)


def test_pack_samples():
    a = Sample(prompt_index=0, prompt="", completion="", prompt_ids=[5, 6, 7], completion_ids=[8, 9],
               logprobs=torch.zeros(2), policy_version=0)
    b = dataclasses.replace(a, prompt_ids=[1], completion_ids=[2, 3, 4])
    c = dataclasses.replace(a, prompt_ids=[11, 12], completion_ids=[])
    packed = pack_samples([a, b, c])
    assert packed.tokens.tolist() == [5, 6, 7, 8, 9, 1, 2, 3, 4, 11, 12]
    assert packed.positions.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1]
    assert packed.cu_seqlens.dtype == torch.int32 and packed.cu_seqlens.tolist() == [0, 5, 9, 11]
    # token 8 (row 3) is predicted by row 2, token 2 (row 6) by row 5
    assert packed.target_index.tolist() == [2, 3, 5, 6, 7]
    assert packed.target_ids.tolist() == [8, 9, 2, 3, 4]
    assert torch.equal(packed.tokens[packed.target_index + 1], packed.target_ids)
    assert packed.num_targets == [2, 3, 0]
    with pytest.raises(ValueError, match="no prompt_ids"):
        pack_samples([dataclasses.replace(a, prompt_ids=[])])


def test_logprobs_deterministic_and_batch_invariant(model_cfg):
    samples = make_samples()
    big = Trainer(model_cfg, TrainerConfig(micro_batch_size=4))
    first = big.logprobs(samples, TEMPERATURE)
    assert [lp.shape for lp in first] == [(len(s.completion_ids),) for s in samples]
    assert all(lp.dtype == torch.float32 and (lp < 0).all() for lp in first)
    again = big.logprobs(samples, TEMPERATURE)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    # each sample alone, in reverse order, in a fresh trainer: same bits
    single = Trainer(model_cfg, TrainerConfig(micro_batch_size=1))
    alone = single.logprobs(samples[::-1], TEMPERATURE)[::-1]
    assert all(torch.equal(x, y) for x, y in zip(first, alone))
    # temperature is applied: a different temperature gives different logprobs
    hot = big.logprobs(samples[:1], 1.0)[0]
    assert not torch.equal(hot, first[0])
    with pytest.raises(ValueError, match="temperature"):
        big.logprobs(samples, 0.0)


def test_stock_impl_agrees_with_lockstep(model_cfg):
    """TorchTitan's own Qwen3 (padded batch, its own attention) on the same checkpoint:
    close, not bitwise (different kernels); this checks packing and target alignment."""
    samples = make_samples()
    ours = Trainer(model_cfg, TrainerConfig()).logprobs(samples, TEMPERATURE)
    stock_cfg = dataclasses.replace(model_cfg, impl="stock")
    stock = Trainer(stock_cfg, TrainerConfig()).logprobs(samples, TEMPERATURE)
    for x, y in zip(ours, stock):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5)


def test_training_raises_the_rewarded_completion(model_cfg):
    trainer = Trainer(model_cfg, TrainerConfig(lr=1e-2, micro_batch_size=2))
    samples = make_samples(num_prompts=1, num_per_prompt=4)
    rewards = [1.0, 0.0, 0.0, 0.0]
    before = trainer.logprobs(samples, TEMPERATURE)
    for step in range(3):
        on_policy(trainer, samples, rewards)
        metrics = trainer.train_step(TrainBatch(samples=samples, temperature=TEMPERATURE))
        # on-policy: the trainer's grad-enabled logprobs equal the no-grad ones bit for bit
        assert metrics["ratio_mean"] == 1.0 and metrics["ratio_max"] == 1.0 and metrics["clip_frac"] == 0.0
        assert metrics["num_tokens"] == sum(len(s.completion_ids) for s in samples)
        assert metrics["grad_norm"] > 0 and metrics["version"] == step + 1
    after = trainer.logprobs(samples, TEMPERATURE)
    assert after[0].sum() > before[0].sum()
    assert all(after[i].sum() < before[i].sum() for i in (1, 2, 3))
    assert trainer.version == 3
    # stale samples (generated at v2) are refused
    with pytest.raises(ValueError, match="on-policy"):
        trainer.train_step(TrainBatch(samples=samples, temperature=TEMPERATURE))


def test_forward_backward_returns_the_barrier_logprobs_and_drop_leaves_everything(model_cfg):
    """The training forward's logprobs are the no-grad ones bit for bit (so the barrier needs
    no scoring pass); dropped gradients change no weight, optimizer state, LR or version."""
    trainer = Trainer(model_cfg, TrainerConfig(lr=1e-2, micro_batch_size=2))
    samples = make_samples(num_prompts=2, num_per_prompt=3)
    on_policy(trainer, samples, [1.0, 0.0, 0.5, 0.0, 1.0, 0.25])
    batch = TrainBatch(samples=samples, temperature=TEMPERATURE)
    trainer.train_step(batch)  # Adam has state and the LR schedule has moved
    on_policy(trainer, samples)
    before = {n: p.detach().clone() for n, p in trainer.scorer.named_parameters()}
    optim_before = {k: v.clone() if torch.is_tensor(v) else v
                    for k, v in trainer.optimizers.state_dict().items()}

    got = trainer.forward_backward(batch)
    assert all(torch.equal(x, y) for x, y in zip(got, trainer.logprobs(samples, TEMPERATURE)))
    assert [x.shape for x in got] == [(len(s.completion_ids),) for s in samples]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.scorer.parameters())
    trainer.drop_gradients()
    assert all(p.grad is None or not p.grad.any() for p in trainer.scorer.parameters())
    assert all(torch.equal(before[n], p) for n, p in trainer.scorer.named_parameters())
    assert trainer.version == 1 and trainer.step == 1
    for k, v in trainer.optimizers.state_dict().items():
        assert torch.equal(v, optim_before[k]) if torch.is_tensor(v) else v == optim_before[k], k
    with pytest.raises(RuntimeError, match="no gradients are pending; call forward_backward"):
        trainer.optimizer_step()
    # the same batch still trains afterwards
    trainer.forward_backward(batch)
    assert trainer.optimizer_step()["version"] == 2
    assert not torch.equal(before["model.norm.weight"], trainer.scorer.model.norm.weight)


def test_kl_to_reference(model_cfg):
    trainer = Trainer(model_cfg, TrainerConfig(lr=1e-2, kl_coef=0.1))
    samples = make_samples(num_prompts=1, num_per_prompt=2)
    first = trainer.train_step(TrainBatch(samples=on_policy(trainer, samples, [1.0, 0.0]), temperature=TEMPERATURE))
    assert first["kl"] == 0.0  # the reference is the initial policy
    second = trainer.train_step(TrainBatch(samples=on_policy(trainer, samples, [1.0, 0.0]), temperature=TEMPERATURE))
    assert second["kl"] > 0.0 and second["loss"] == second["pg_loss"] + 0.1 * second["kl"]


def test_bad_batches_and_versions(model_cfg):
    trainer = Trainer(model_cfg, TrainerConfig())
    samples = make_samples(num_prompts=1)
    with pytest.raises(ValueError, match="no advantage"):
        trainer.train_step(TrainBatch(samples=on_policy(trainer, samples), temperature=TEMPERATURE))
    samples[0].advantage = samples[1].advantage = 0.0
    samples[0].logprobs = torch.zeros(len(samples[0].completion_ids) + 1)
    with pytest.raises(ValueError, match="logprobs shape"):
        trainer.train_step(TrainBatch(samples=samples, temperature=TEMPERATURE))
    with pytest.raises(ValueError, match="version 0"):
        asyncio.run(trainer.push_weights(1))


def test_save_load_resumes_exactly(model_cfg, tmp_path):
    cfg = TrainerConfig(lr=1e-2, warmup_steps=2, micro_batch_size=3)
    samples = make_samples(num_prompts=2, num_per_prompt=2)
    rewards = [0.0, 1.0, 2.0, 0.0]

    def step(trainer):
        return trainer.train_step(TrainBatch(samples=on_policy(trainer, samples, rewards), temperature=TEMPERATURE))

    a = Trainer(model_cfg, cfg)
    step(a)
    ckpt = tmp_path / "ckpt"
    a.save(str(ckpt))
    a.save(str(ckpt))  # overwriting a checkpoint replaces it whole
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    saved_logprobs = a.logprobs(samples, TEMPERATURE)
    after_save = torch.rand(4)  # the RNG is part of the state
    a_metrics = step(a)

    b = Trainer(model_cfg, cfg)
    torch.rand(7)  # b's RNG elsewhere
    b.load(str(ckpt))
    assert b.version == 1 and b.step == 1
    assert torch.equal(torch.rand(4), after_save)
    assert all(torch.equal(x, y) for x, y in zip(saved_logprobs, b.logprobs(samples, TEMPERATURE)))
    # weights, Adam moments and the warmup position (lr) all came back: the next step matches,
    # metrics and resulting weights
    b_metrics = step(b)
    assert b_metrics == a_metrics and a_metrics["lr"] == cfg.lr
    assert all(torch.equal(x, y) for x, y in zip(a.logprobs(samples, TEMPERATURE), b.logprobs(samples, TEMPERATURE)))
    with pytest.raises(ValueError, match="no trainer checkpoint"):
        b.load(str(tmp_path / "missing"))


def test_hf_export_and_fingerprint_are_the_weights(model_cfg, tmp_path):
    """export_hf writes the weights as a HF checkpoint that transformers loads; the
    fingerprint is that of the same tensors."""
    import json
    import shutil

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lockstep.actors.weight_sync import fingerprint

    trainer = Trainer(model_cfg, TrainerConfig(lr=1e-2))
    samples = make_samples()
    trainer.train_step(TrainBatch(samples=on_policy(trainer, samples, [0.0, 1.0] * 3), temperature=TEMPERATURE))
    trainer.export_hf(str(tmp_path))
    exported = load_file(tmp_path / "model.safetensors")
    weights = {n: t.detach() for n, t in trainer.scorer.hf_state_dict().items()}
    assert exported.keys() == weights.keys() and all(torch.equal(exported[n], weights[n]) for n in weights)
    assert trainer.fingerprint() == fingerprint(exported, 1)
    assert trainer.fingerprint().version == 1

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(model_cfg.path, name), tmp_path / name)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32)
    hf_weights = hf.state_dict()
    assert all(torch.equal(hf_weights[n], t) for n, t in exported.items())
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"]  # so no lm_head is stored


# --- FSDP over 2 gloo ranks ---------------------------------------------------------------


def _fsdp_worker(rank, world_size, port, model_cfg, samples, out_dir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size, 1), mesh_dim_names=("dp_shard", "tp"))
        trainer = Trainer(model_cfg, FSDP_CFG, "cpu", mesh)
        logprobs = trainer.logprobs(samples, TEMPERATURE)
        one = trainer.logprobs(samples[:1], TEMPERATURE)  # rank 1 has nothing to score
        fp = trainer.fingerprint()  # of the FSDP shards, summed over the ranks
        fingerprint = (fp.version, fp.tensors)  # plain data: torch.load(weights_only) reads it
        metrics = trainer.train_step(TrainBatch(samples=samples, temperature=TEMPERATURE))
        after = trainer.logprobs(samples, TEMPERATURE)
        trainer.save(os.path.join(out_dir, "ckpt"))
        trainer.export_hf(os.path.join(out_dir, "hf"))  # gathers the shards; rank 0 writes
        tp_error = None
        try:
            Trainer(model_cfg, TrainerConfig(), "cpu",
                    init_device_mesh("cpu", (1, world_size), mesh_dim_names=("dp_shard", "tp")))
        except ValueError as e:  # the tiny model's one KV head does not split over 2 ranks
            tp_error = str(e)
        torch.save({"logprobs": logprobs, "one": one, "metrics": metrics, "after": after, "tp_error": tp_error,
                    "fingerprint": fingerprint},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# 5 samples over 2 ranks in micro-batches of 2: rank 0 runs 2 micro-batches, rank 1 one and a
# filler; kl_coef > 0 puts the FSDP-sharded reference model in the step too.
FSDP_CFG = TrainerConfig(lr=1e-2, micro_batch_size=2, kl_coef=0.1)


@pytest.mark.slow  # two spawned procs import torch + TorchTitan: ~1 min on 2 cores
def test_fsdp_two_ranks_match_single_process(model_cfg, tmp_path, spawn):
    samples = make_samples(num_prompts=3, num_per_prompt=2)[:5]
    single = Trainer(model_cfg, FSDP_CFG)
    expected = single.logprobs(samples, TEMPERATURE)
    on_policy(single, samples)
    for s, advantage in zip(samples, [1.0, -1.0, 0.5, -0.5, 1.0]):
        s.advantage = advantage
    single_fingerprint = single.fingerprint()
    single_metrics = single.train_step(TrainBatch(samples=samples, temperature=TEMPERATURE))

    spawn(_fsdp_worker, (2, _free_port(), model_cfg, samples, str(tmp_path)), 2)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for result in results:
        # every rank returns the full list in sample order, bitwise the single-process values
        assert len(result["logprobs"]) == len(samples)
        assert all(torch.equal(x, y) for x, y in zip(result["logprobs"], expected))
        assert len(result["one"]) == 1 and torch.equal(result["one"][0], expected[0])
        metrics = result["metrics"]
        assert metrics["ratio_mean"] == 1.0 and metrics["num_tokens"] == single_metrics["num_tokens"]
        assert metrics["kl"] == 0.0 and metrics["version"] == 1.0
        assert metrics["loss"] == pytest.approx(single_metrics["loss"], rel=1e-5, abs=1e-7)
        assert metrics["grad_norm"] == pytest.approx(single_metrics["grad_norm"], rel=1e-4)
        assert "trainer layout tp=2 does not split the model's num_kv_heads=1" in result["tp_error"]
        assert result["fingerprint"] == (single_fingerprint.version, single_fingerprint.tensors)  # other layout
    # the FSDP step moved the weights like the single-process one (summation order differs)
    single_after = single.logprobs(samples, TEMPERATURE)
    assert not torch.equal(single_after[0], expected[0])
    for x, y in zip(results[0]["after"], single_after):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-4)
    # the FSDP checkpoint loads into one process (DCP reshards): same weights, same bits
    resumed = Trainer(model_cfg, FSDP_CFG)
    resumed.load(str(tmp_path / "ckpt"))
    assert resumed.version == 1
    assert all(torch.equal(x, y) for x, y in zip(resumed.logprobs(samples, TEMPERATURE), results[0]["after"]))
    # the HF export of the sharded weights is the full weights
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert all(torch.equal(exported[n], t) for n, t in resumed.scorer.hf_state_dict().items())


# --- the Monarch actor ------------------------------------------------------------------------


@pytest.mark.slow  # spawns the local-cpu trainer mesh (2 procs) and a torchstore: ~1 min
def test_trainer_actor_on_the_local_cpu_mesh(model_cfg):
    from lockstep.actors import weight_sync
    from lockstep.actors.trainer import TrainerActor
    from lockstep.controller.mesh_config import load_mesh_config
    from lockstep.controller.meshes import Meshes

    samples = make_samples(num_prompts=2, num_per_prompt=2)
    expected = Trainer(model_cfg, TrainerConfig()).logprobs(samples, TEMPERATURE)

    def by_rank(value_mesh):
        return [v for _, v in sorted(value_mesh.items(), key=lambda item: item[0].rank)]

    async def run():
        async with Meshes(load_mesh_config("local-cpu")) as meshes:
            layout = meshes.layout("trainer")
            assert layout.num_procs == 2
            trainer = await meshes.spawn_role("trainer", TrainerActor, model_cfg, TrainerConfig(), layout)
            await weight_sync.start_store(await meshes.procs("trainer"))
            try:
                per_rank = by_rank(await trainer.logprobs.call(samples, TEMPERATURE))
                for logprobs in per_rank:
                    assert all(torch.equal(x, y) for x, y in zip(logprobs, expected))
                for s, lp in zip(samples, per_rank[0]):
                    s.logprobs = lp
                for s, r in zip(samples, [1.0, 0.0, 0.0, 1.0]):
                    s.reward = r
                assign_advantages(samples)
                batch = TrainBatch(samples=samples, temperature=TEMPERATURE)
                for logprobs in by_rank(await trainer.forward_backward.call(batch)):
                    assert all(torch.equal(x, y) for x, y in zip(logprobs, expected))
                metrics = by_rank(await trainer.optimizer_step.call())
                assert metrics[0] == metrics[1] and metrics[0]["ratio_mean"] == 1.0
                assert by_rank(await trainer.version.call()) == [1, 1]
                await trainer.push_weights.call(1)
                assert await weight_sync.latest_version() == 1
                with pytest.raises(Exception, match="weights are at version 1"):
                    await trainer.push_weights.call(2)
            finally:
                await weight_sync.stop_store()

    asyncio.run(run())
