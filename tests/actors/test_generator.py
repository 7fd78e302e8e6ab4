"""GeneratorConfig, the vLLM engine arguments, output conversion, and GeneratorActor on a
real Monarch proc mesh pulling weights through torchstore (the last one is slow).

The engine-level claims (bitwise parity with the trainer, batch invariance, in-place reload
equal to a fresh engine, impl=stock) are in tests/models/test_vllm_qwen3.py.
"""

import asyncio
import os
import shutil
import sys
from types import SimpleNamespace

import cloudpickle
import pytest
import torch
from monarch.actor import Actor, endpoint
from safetensors.torch import save_file

from lockstep.actors import weight_sync
from lockstep.actors.generation import request_seed, to_samples
from lockstep.actors.generator import GeneratorActor
from lockstep.actors.vllm_engine import ARCHITECTURE, GeneratorConfig, configure_process, engine_args, uses_cuda_graphs
from lockstep.models import ModelConfig
from lockstep.models.qwen3 import read_safetensors
from lockstep.models.tiny import write_tiny_checkpoint

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the procs cannot import this file


def test_config_defaults_and_validation():
    cfg = GeneratorConfig()
    assert (cfg.num_samples, cfg.temperature, cfg.top_p, cfg.max_tokens, cfg.seed) == (8, 1.0, 1.0, 32, 0)
    assert (cfg.max_model_len, cfg.gpu_memory_utilization, cfg.enforce_eager) == (256, 0.3, None)
    # None: CUDA graphs on GPU, eager on CPU; an explicit value wins on both.
    assert uses_cuda_graphs(cfg, "cuda") and not uses_cuda_graphs(cfg, "cpu")
    assert not uses_cuda_graphs(GeneratorConfig(enforce_eager=True), "cuda")
    assert uses_cuda_graphs(GeneratorConfig(enforce_eager=False), "cpu")
    for bad, field in [
        (dict(num_samples=0), "num_samples"),
        (dict(temperature=0.0), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_tokens=256), "max_tokens"),
        (dict(gpu_memory_utilization=0), "gpu_memory_utilization"),
    ]:
        with pytest.raises(ValueError, match=f"generator.{field}"):
            GeneratorConfig(**bad)
    with pytest.raises(TypeError):
        GeneratorConfig(8)  # kw_only


def test_engine_args_follow_the_parity_rules(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "ckpt")
    gen_cfg = GeneratorConfig(seed=3, max_model_len=128, max_tokens=16)
    args = engine_args(ModelConfig(path=str(path)), gen_cfg, "cpu")
    assert args["model"] == str(path) and args["dtype"] == "float32" and args["seed"] == 3
    assert args["enable_prefix_caching"] is False
    assert args["logprobs_mode"] == "processed_logits"  # the model's own log_softmax (models/vllm/qwen3.py)
    assert args["hf_overrides"] == {"architectures": [ARCHITECTURE]}
    assert args["max_model_len"] == 128 and args["enforce_eager"] is True
    assert "gpu_memory_utilization" not in args and args["kv_cache_memory_bytes"] >= 16 << 20
    assert "distributed_executor_backend" not in args and "compilation_config" not in args

    # GPU: lockstep's decode steps replay whole-model CUDA graphs without torch.compile.
    gpu = engine_args(ModelConfig(path=str(path)), gen_cfg, "cuda")
    assert gpu["enforce_eager"] is False
    assert gpu["compilation_config"] == {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}
    eager = engine_args(ModelConfig(path=str(path)), GeneratorConfig(enforce_eager=True), "cuda")
    assert eager["enforce_eager"] is True and "compilation_config" not in eager

    stock = engine_args(ModelConfig(path=str(path), impl="stock"), gen_cfg, "cuda", tp=2, dp=2)
    assert "hf_overrides" not in stock and stock["gpu_memory_utilization"] == 0.3
    assert stock["logprobs_mode"] == "processed_logprobs"  # vLLM's own softmax of its logits
    assert "compilation_config" not in stock  # vLLM's own defaults (torch.compile + graphs)
    assert (stock["tensor_parallel_size"], stock["data_parallel_size"]) == (2, 2)
    assert stock["distributed_executor_backend"] == "external_launcher"

    # lockstep's Qwen3 is tensor-parallel inside vLLM too: one vLLM rank per Monarch proc.
    ours = engine_args(ModelConfig(path=str(path)), gen_cfg, "cuda", tp=2)
    assert ours["hf_overrides"] == {"architectures": [ARCHITECTURE]} and ours["tensor_parallel_size"] == 2
    assert ours["distributed_executor_backend"] == "external_launcher"


def test_model_runner_is_v2_on_gpu_v1_on_cpu_and_the_environment_wins(monkeypatch):
    # A scratch copy of the environment: nothing configure_process sets outlives the test.
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items()
                                        if k not in ("VLLM_USE_V2_MODEL_RUNNER", "LOCAL_RANK")})
    for device, want in (("cuda", "1"), ("cpu", "0")):
        os.environ.pop("VLLM_USE_V2_MODEL_RUNNER", None)
        configure_process(device, tp=1)
        assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == want, device
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    configure_process("cuda", tp=1)
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    del os.environ["VLLM_USE_V2_MODEL_RUNNER"]
    configure_process("cuda", tp=1, impl="stock")  # stock keeps vLLM's own choice
    assert "VLLM_USE_V2_MODEL_RUNNER" not in os.environ


def test_request_seeds_are_deterministic_and_distinct():
    seeds = [request_seed(0, r, c, i) for r in range(2) for c in range(3) for i in range(50)]
    assert seeds == [request_seed(0, r, c, i) for r in range(2) for c in range(3) for i in range(50)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**30 for s in seeds)
    assert request_seed(1, 0, 0, 0) != request_seed(0, 0, 0, 0)


def test_outputs_become_samples_with_exact_fp32_logprobs():
    values = torch.randn(5, dtype=torch.float32)
    floats = values.tolist()  # what vLLM hands back: Python floats of fp32 values
    logprob = lambda x: SimpleNamespace(logprob=x)
    completion = lambda ids, lps: SimpleNamespace(
        token_ids=ids, text="".join(map(str, ids)), logprobs=[{t: logprob(x), 99: logprob(-9.0)} for t, x in zip(ids, lps)]
    )
    outputs = [
        SimpleNamespace(prompt_token_ids=[1, 2], outputs=[completion([3, 4], floats[:2]), completion([5], floats[2:3])]),
        SimpleNamespace(prompt_token_ids=[6], outputs=[completion([7, 8], floats[3:])]),
    ]
    samples = to_samples(outputs, ["a", "b"], [{"x": 1}, {"x": 2}], policy_version=4)
    assert [s.prompt_index for s in samples] == [0, 0, 1]
    assert [s.completion_ids for s in samples] == [[3, 4], [5], [7, 8]]
    assert [s.prompt_ids for s in samples] == [[1, 2], [1, 2], [6]]
    assert [s.fields for s in samples] == [{"x": 1}, {"x": 1}, {"x": 2}]
    assert all(s.policy_version == 4 and s.logprobs.dtype == torch.float32 for s in samples)
    assert torch.equal(torch.cat([s.logprobs for s in samples]), values)

    no_logprobs = [SimpleNamespace(prompt_token_ids=[1], outputs=[SimpleNamespace(token_ids=[2], text="2", logprobs=None)])]
    with pytest.raises(RuntimeError, match="logprobs=0"):
        to_samples(no_logprobs, ["a"], [{}], 0)


def test_flat_logprobs_and_one_decode_per_completion():
    """What the Generator asks vLLM for (flat_logprobs, detokenize=False): the values come from
    the flat list, the text from one decode of the completion's ids."""
    from vllm.logprobs import FlatLogprobs, Logprob

    values = torch.randn(4, dtype=torch.float32).tolist()
    ids = [11, 12, 13, 14]

    def outputs(extra: dict):
        flat = FlatLogprobs()
        for token, value in zip(ids, values):
            flat.append({token: Logprob(logprob=value, rank=3, decoded_token=None), **extra})
        done = SimpleNamespace(token_ids=ids, text="", logprobs=flat, index=0)
        return [SimpleNamespace(prompt_token_ids=[1], outputs=[done])], flat

    tokenizer = SimpleNamespace(decode=lambda token_ids, skip_special_tokens: "|".join(map(str, token_ids)))
    for extra in ({}, {99: Logprob(logprob=-9.0, rank=1, decoded_token=None)}):  # sampled only; + a top-1
        out, flat = outputs(extra)
        (sample,) = to_samples(out, ["p"], [{}], 0, [5], tokenizer)
        assert torch.equal(sample.logprobs, torch.tensor(values, dtype=torch.float32))
        assert sample.completion == "11|12|13|14" and sample.seed == 5
    flat.append({7: Logprob(logprob=-1.0, rank=1, decoded_token=None)})  # a position without a token
    with pytest.raises(RuntimeError, match="logprobs=0"):
        to_samples(out, ["p"], [{}], 0, [5], tokenizer)


# -- GeneratorActor on a proc mesh, weights through torchstore ---------------------------------


class Pusher(Actor):
    """Stands in for the trainer: holds the store volume and pushes HF-named weights."""

    @endpoint
    async def push(self, path: str, version: int) -> None:
        await weight_sync.push_state_dict(read_safetensors(path), version)


def _checkpoints(tmp_path):
    old = write_tiny_checkpoint(tmp_path / "old", tie_word_embeddings=True)
    gen = torch.Generator().manual_seed(0)
    weights = read_safetensors(old)
    weights["model.embed_tokens.weight"] = 0.05 * torch.randn(weights["model.embed_tokens.weight"].shape, generator=gen)
    save_file(weights, old / "model.safetensors", metadata={"format": "pt"})
    new = tmp_path / "new"
    shutil.copytree(old, new)
    save_file({n: w + 0.05 * torch.randn(w.shape, generator=gen) for n, w in weights.items()}, new / "model.safetensors")
    return old, new


@pytest.mark.slow
def test_actor_generates_refuses_stale_versions_and_pulls_weights(tmp_path):
    from lockstep.controller.mesh_config import GeneratorRole, MeshConfig, RewardRole, TrainerRole
    from lockstep.controller.meshes import Meshes

    old, new = _checkpoints(tmp_path)
    gen_cfg = GeneratorConfig(max_tokens=8, num_samples=2, temperature=0.8)
    meshes = Meshes(MeshConfig(name="test", device="cpu", procs=3, generator=GeneratorRole(), trainer=TrainerRole(),
                               reward=RewardRole()))
    layout = meshes.layout("generator")
    prompts, fields = ["1+2=", "3*4="], [{"answer": "3"}, {"answer": "12"}]

    async def run():
        pusher = await meshes.spawn_role("trainer", Pusher)
        await weight_sync.start_store(await meshes.procs("trainer"))
        try:
            one = lambda mesh, endpoint, *args: getattr(mesh, endpoint).call_one(*args)
            engines = {}
            # Three engines in one proc: start them one at a time (vLLM's process-wide parallel
            # state is not safe to initialize concurrently); a call waits for the actor's init.
            for name, model_cfg in [("gen", ModelConfig(path=str(old))), ("stock", ModelConfig(path=str(old), impl="stock")),
                                    ("fresh", ModelConfig(path=str(new)))]:
                engines[name] = await meshes.spawn_role("generator", GeneratorActor, model_cfg, gen_cfg, layout, name=name)
                assert await one(engines[name], "version") == 0
            gen, stock, fresh = engines["gen"], engines["stock"], engines["fresh"]

            before = await one(gen, "generate", prompts, fields, 0)
            assert len(before) == 4 and [s.fields for s in before] == [fields[0]] * 2 + [fields[1]] * 2
            assert all(s.policy_version == 0 and len(s.logprobs) == len(s.completion_ids) for s in before)
            stock_before = await one(stock, "generate", prompts, fields, 0, 1, 0.0, 4)  # n, temperature, max_tokens
            assert len(stock_before) == 2 and all(len(s.completion_ids) <= 4 for s in stock_before)

            await one(pusher, "push", str(new), 1)
            with pytest.raises(Exception, match="holds weights v0, the step expects v1"):
                await one(gen, "generate", prompts, fields, 1)
            await asyncio.gather(one(gen, "update_weights", 1), one(stock, "update_weights", 1))
            assert await one(gen, "version") == await one(stock, "version") == 1

            # Seeds follow the call count (a refused call does not count): bring fresh to call 1 too.
            await one(fresh, "generate", prompts, fields, 0)
            after = await one(gen, "generate", prompts, fields, 1)
            want = await one(fresh, "generate", prompts, fields, 0)
            for a, w in zip(after, want):
                assert a.completion_ids == w.completion_ids and torch.equal(a.logprobs, w.logprobs)
            assert any(a.completion_ids != b.completion_ids for a, b in zip(after, before))
            stock_after = await one(stock, "generate", prompts, fields, 1, 1, 0.0, 4)
            assert all(s.policy_version == 1 for s in stock_after)
        finally:
            await weight_sync.stop_store()
            await meshes.shutdown()

    asyncio.run(run())
