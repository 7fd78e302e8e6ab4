"""lockstep's Qwen3 inside vLLM (in-process; CPU, or the GPU where there is one), driven through `Generator`.

The product claim: the logprob vLLM reports for a sampled token equals, bit for bit, what
the trainer computes for it (our Qwen3 over the packed prompt + completion, then
`kernels.token_logprobs`). Plus: a prompt gets the same tokens and logprobs alone or in a
batch of 64, in-place weight reloads leave no stale state, and impl=stock still runs.
On a GPU every test runs twice: decode steps replayed as CUDA graphs (the default there;
batches padded to captured sizes) and eager. Engines are shared per module (each start costs seconds).
"""

import shutil

import pytest
import torch
from safetensors.torch import save_file

from lockstep.actors.generator import Generator, GeneratorConfig
from lockstep.actors.trainer import pack_samples
from lockstep.models import ModelConfig, build_model
from lockstep.models.qwen3 import read_safetensors, token_logprobs_packed
from lockstep.models.tiny import write_tiny_checkpoint

MAX_TOKENS = 12
TEST_SHAPE = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=96,
                  max_position_embeddings=1024)  # room for the long-context test
PROMPTS = [f"{a}+{b}=" for a in range(8) for b in range(8)]  # 64 distinct prompts


# vLLM runs on the GPU wherever there is one; the trainer side must use the same device.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODES = ["graphs", "eager"] if DEVICE == "cuda" else ["eager"]  # vLLM's CPU backend captures no graphs


def _engine(path, impl="lockstep", mode="eager", max_model_len=256) -> Generator:
    # Up to six engines share one GPU here, each with a small slice.
    gen_cfg = GeneratorConfig(max_tokens=MAX_TOKENS, gpu_memory_utilization=0.1, enforce_eager=mode == "eager",
                              max_model_len=max_model_len)
    generator = Generator(ModelConfig(path=str(path), impl=impl), gen_cfg, DEVICE)
    assert generator.graphs == (mode == "graphs")
    return generator


def _rewrite(path, weights) -> None:
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    """Tied tiny Qwen3 (GQA 4/2) with random norms and an embedding scaled so next-token entropy is ~2 nats:
    samples vary and logprobs are far from 0 (a peaked model would make equalities trivial)."""
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), **TEST_SHAPE)
    gen = torch.Generator().manual_seed(3)
    weights = read_safetensors(path)
    for name, w in weights.items():
        if name.endswith("norm.weight"):
            weights[name] = 1 + 0.3 * torch.randn(w.shape, generator=gen)
        elif name.endswith("embed_tokens.weight"):
            weights[name] = 0.05 * torch.randn(w.shape, generator=gen)
    _rewrite(path, weights)
    return path


@pytest.fixture(scope="module")
def new_dir(ckpt_dir, tmp_path_factory):
    """ckpt_dir with every weight perturbed: the 'next policy version'."""
    out = tmp_path_factory.mktemp("new") / "ckpt"
    shutil.copytree(ckpt_dir, out)
    gen = torch.Generator().manual_seed(7)
    _rewrite(out, {n: w + 0.05 * torch.randn(w.shape, generator=gen) for n, w in read_safetensors(ckpt_dir).items()})
    return out


@pytest.fixture(scope="module")
def engines(ckpt_dir, new_dir):
    """Engines made on demand and kept for the module: vLLM engines of one process share its
    parallel-state groups, and deleting one tears them down under the others."""
    made = {}

    def get(impl: str, which: str, mode: str = "eager", max_model_len: int = 256) -> Generator:
        key = (impl, which, mode, max_model_len)
        if key not in made:
            made[key] = _engine(ckpt_dir if which == "old" else new_dir, impl, mode, max_model_len)
        return made[key]

    return get


@pytest.fixture(scope="module", params=MODES)
def engine(engines, request):
    return engines("lockstep", "old", request.param)


@pytest.fixture(scope="module")
def trainer_model(ckpt_dir):
    return build_model(ModelConfig(path=str(ckpt_dir)), DEVICE)


def _fields(prompts):
    return [{"i": i} for i in range(len(prompts))]


def _same(a, b) -> bool:
    return a.completion_ids == b.completion_ids and torch.equal(a.logprobs, b.logprobs)


@torch.no_grad()
def trainer_logprobs(model, samples, temperature: float) -> list[torch.Tensor]:
    """The trainer's side: one packed varlen forward over prompt + completion of every sample."""
    batch = pack_samples(samples).to(torch.device(DEVICE))
    flat = token_logprobs_packed(
        model, batch.tokens, batch.positions, batch.cu_seqlens, batch.target_index, batch.target_ids, temperature
    )
    return list(flat.cpu().split(batch.num_targets))


@pytest.mark.parametrize("temperature", [0.7, 0.0])
def test_generator_logprobs_equal_trainer_bitwise(engine, trainer_model, temperature):
    prompts = PROMPTS[:6]
    n = 2 if temperature else 1  # greedy: one completion per prompt
    samples = engine.generate(prompts, _fields(prompts), 0, n=n, temperature=temperature, seeds=list(range(6)))
    assert [s.prompt_index for s in samples] == [i // n for i in range(6 * n)]
    assert all(s.logprobs.dtype == torch.float32 and len(s.logprobs) == len(s.completion_ids) > 0 for s in samples)
    # Greedy: vLLM reports log_softmax of the raw logits, i.e. temperature 1.
    logprobs = torch.cat([s.logprobs for s in samples])
    assert (logprobs < -0.1).float().mean() > 0.3, "the test model must not be peaked"
    expected = trainer_logprobs(trainer_model, samples, temperature or 1.0)
    for i, (s, want) in enumerate(zip(samples, expected)):
        assert torch.equal(s.logprobs, want), (i, s.logprobs - want)


@pytest.mark.skipif(DEVICE != "cuda", reason="the split-KV decode launch is the GPU kernel's")
@pytest.mark.parametrize("mode", MODES)
def test_long_context_decode_equals_trainer_bitwise(engines, trainer_model, mode):
    """Prompts of 600-700 tokens: every decode step reads the cache over several SPLIT_KV splits,
    and a batch this small takes the split launch (a program per split, then the merge); the
    trainer's prefill walks the splits in one program. Same bits."""
    from lockstep.kernels.triton.attention import SPLIT_KV

    engine = engines("lockstep", "old", mode, max_model_len=1024)
    prompts = [(PROMPTS[i] * 200)[: 600 + 40 * i] for i in range(3)]
    assert min(map(len, prompts)) > 2 * SPLIT_KV
    samples = engine.generate(prompts, _fields(prompts), 0, n=2, temperature=0.7, seeds=[0, 1, 2])
    assert all(len(s.prompt_ids) > 2 * SPLIT_KV and len(s.completion_ids) > 0 for s in samples)
    expected = trainer_logprobs(trainer_model, samples, 0.7)
    for i, (s, want) in enumerate(zip(samples, expected)):
        assert torch.equal(s.logprobs, want), (i, s.logprobs - want)


def test_top_p_reports_the_full_softmax_logprob(engine, trainer_model):
    """top_p < 1 decides which tokens can be drawn; the reported logprob stays the model's
    log_softmax at T, the quantity the trainer scores, so the strict barrier holds."""
    prompts = PROMPTS[:6]

    def sample(top_p):
        engine.gen_cfg.top_p = top_p
        try:
            return engine.generate(prompts, _fields(prompts), 0, n=2, temperature=0.7, seeds=list(range(6)))
        finally:
            engine.gen_cfg.top_p = 1.0

    nucleus, full = sample(0.5), sample(1.0)
    assert any(a.completion_ids != b.completion_ids for a, b in zip(nucleus, full)), "top_p=0.5 changed nothing"
    expected = trainer_logprobs(trainer_model, nucleus, 0.7)
    for i, (s, want) in enumerate(zip(nucleus, expected)):
        assert torch.equal(s.logprobs, want), (i, s.logprobs - want)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_prompt_alone_equals_prompt_in_batch_of_64(engine, temperature):
    target = 37
    seeds = [1000 + i for i in range(len(PROMPTS))]
    n = 2 if temperature else 1
    alone = engine.generate([PROMPTS[target]], [{}], 0, n=n, temperature=temperature, seeds=[seeds[target]])
    batch = engine.generate(PROMPTS, _fields(PROMPTS), 0, n=n, temperature=temperature, seeds=seeds)
    in_batch = [s for s in batch if s.prompt_index == target]
    assert len(alone) == len(in_batch) == n
    for a, b in zip(alone, in_batch):
        assert a.prompt == b.prompt == PROMPTS[target]
        assert _same(a, b), (a.completion_ids, b.completion_ids, a.logprobs - b.logprobs)


def test_sampling_is_seeded_and_samples_differ(engine):
    prompts = PROMPTS[:4]
    first = engine.generate(prompts, _fields(prompts), 0, n=2, temperature=1.0, seeds=[1, 2, 3, 4])
    again = engine.generate(prompts, _fields(prompts), 0, n=2, temperature=1.0, seeds=[1, 2, 3, 4])
    assert all(_same(a, b) for a, b in zip(first, again))
    assert len({tuple(s.completion_ids) for s in first}) > 1  # n samples and prompts are not copies
    assert [s.fields for s in first] == [{"i": i // 2} for i in range(8)]


def test_wrong_version_is_refused(engine):
    with pytest.raises(RuntimeError, match=r"holds weights v0, the step expects v3; call update_weights\(3\)"):
        engine.generate(PROMPTS[:1], [{}], 3)


def test_pull_targets_are_the_live_parameters(engine, ckpt_dir):
    """update_weights pulls into these: the checkpoint's HF names, each one a live parameter,
    so torchstore writes the new weights in place and no copy is left behind."""
    buffers = engine.weight_buffers()
    assert set(buffers) == set(read_safetensors(ckpt_dir))  # the names the trainer pushes
    live = {p.data_ptr() for p in engine.model().parameters()}
    assert all(t.data_ptr() in live for t in buffers.values())


def _state(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


@pytest.mark.parametrize("impl", ["lockstep", "stock"])
def test_in_place_reload_equals_fresh_engine(engine, engines, ckpt_dir, new_dir, impl):
    """Reload new weights into a running engine: same outputs as an engine started on them;
    reload the old ones back: the original outputs again (no state survives a reload)."""
    mode = "graphs" if engine.graphs and impl == "lockstep" else "eager"  # graphs are lockstep's claim
    running = engine if impl == "lockstep" else engines(impl, "old", mode)
    prompts = PROMPTS[:4]
    kwargs = dict(n=2, temperature=0.7, seeds=[5, 6, 7, 8])
    before = running.generate(prompts, _fields(prompts), 0, **kwargs)
    ptrs = {n: p.data_ptr() for n, p in running.model().named_parameters()}
    try:
        running.load_hf_weights(read_safetensors(new_dir), version=1)
        after = running.generate(prompts, _fields(prompts), 1, **kwargs)
        # The reference engine runs eager: vLLM keeps one process's CUDA graphs for one engine
        # (a second engine's capture drops the first's graphs); graphs == eager bit for bit is
        # what the other tests of this module show.
        fresh_engine = engines(impl, "new", "eager")
        fresh = fresh_engine.generate(prompts, _fields(prompts), 0, **kwargs)
        assert all(_same(a, f) for a, f in zip(after, fresh))
        assert not all(_same(a, b) for a, b in zip(after, before))
        if impl == "lockstep":
            # In place (no new storage), and every tensor the model holds is the fresh engine's.
            model = running.model()
            assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
            assert model.model.output.weight is model.model.tok_embeddings.weight  # tied stays tied
            fresh_state = _state(fresh_engine.model())
            for name, tensor in _state(model).items():
                assert torch.equal(tensor, fresh_state[name]), name
        with pytest.raises(RuntimeError, match="holds weights v1"):
            running.generate(prompts, _fields(prompts), 0)
    finally:
        running.load_hf_weights(read_safetensors(ckpt_dir), version=0)
    restored = running.generate(prompts, _fields(prompts), 0, **kwargs)
    assert all(_same(r, b) for r, b in zip(restored, before))
