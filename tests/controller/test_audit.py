"""The divergence audit: the comparison on hand-made activations, then the real thing in
one process (vLLM engine + Trainer driven through run_step): a generator with one module
nudged by one ulp halts the strict barrier, and the audit names exactly that module."""

import asyncio

import pytest
import torch

from fake_actors import FakeReward
from lockstep.actors.generator import Generator, GeneratorConfig
from lockstep.actors.reward import RewardRunner
from lockstep.actors.trainer import Trainer, TrainerConfig
from lockstep.actors.types import Sample
from lockstep.controller.audit import LOGPROBS, FailedSample, first_divergence, run_audit
from lockstep.controller.barrier import BarrierError
from lockstep.controller.loop import Handles, run_step
from lockstep.models import ModelConfig
from lockstep.models.qwen3.capture import Activations, CapturedRun
from lockstep.models.tiny import write_tiny_checkpoint

TEMPERATURE = 1.0


# --- the comparison ----------------------------------------------------------------------


def _run(outputs: dict, inputs: dict, logprobs, num_prompt=2, positions=None) -> CapturedRun:
    """A CapturedRun whose modules a, b, output record rows for positions 0..3."""
    positions = positions or {m: torch.arange(4) for m in outputs}
    acts = Activations(order=list(outputs), positions=positions, outputs=outputs, inputs=inputs)
    return CapturedRun(prompt_ids=list(range(num_prompt)), completion_ids=[7] * len(logprobs),
                       logprobs=torch.tensor(logprobs, dtype=torch.float32), activations=acts)


def _pair():
    g = torch.Generator().manual_seed(0)
    x, y, z = (torch.randn(4, 3, generator=g) for _ in range(3))
    gen = _run({"a": [x], "b": [y]}, {"a": [x], "b": [x.clone()]}, [-0.5, -1.5, -2.5])
    train = _run({"a": [x.clone()], "b": [y.clone()]}, {"a": [x.clone()], "b": [x.clone()]}, [-0.5, -1.5, -2.5])
    return gen, train


def test_equal_runs_have_no_divergence():
    gen, train = _pair()
    assert first_divergence(gen, train, last_position=3) == (None, 2)


def test_names_the_earliest_position_then_the_first_module_there():
    gen, train = _pair()
    gen.activations.outputs["b"][0][1, 2] += 1.0  # b differs at position 1
    gen.activations.outputs["a"][0][3, 0] += 5.0  # a differs at position 3: later, so not the first
    d, num_modules = first_divergence(gen, train, last_position=3)
    assert (d.module, d.position, d.num_differing, d.num_elements, num_modules) == ("b", 1, 1, 3, 2)
    assert d.max_abs_diff == pytest.approx(1.0) and d.generator_value - d.trainer_value == pytest.approx(1.0)
    assert d.inputs_equal  # b's inputs agree: b itself computes differently
    # ... unless its input already differs (an op between modules)
    gen.activations.inputs["b"][0][0, 0] += 1.0
    assert first_divergence(gen, train, last_position=3)[0].inputs_equal is False
    # positions past the audited token do not count
    assert first_divergence(gen, train, last_position=0)[0] is None


def test_one_ulp_and_signed_zero_count():
    gen, train = _pair()
    t = train.activations.outputs["a"][0]
    t[2, 1] = torch.nextafter(t[2, 1], torch.tensor(float("inf")))
    d, _ = first_divergence(gen, train, last_position=3)
    assert (d.module, d.position, d.num_differing) == ("a", 2, 1) and 0 < d.max_abs_diff < 1e-6


def test_logprobs_alone_blame_the_sampler_step():
    gen, train = _pair()
    # completion token 1 is predicted at row num_prompt - 1 + 1 = 2
    train.logprobs[1] = torch.nextafter(train.logprobs[1], torch.tensor(0.0))
    d, _ = first_divergence(gen, train, last_position=3)
    assert (d.module, d.position, d.num_differing) == (LOGPROBS, 2, 1)
    assert d.inputs_equal is False  # no lm_head ("output") rows recorded here to vouch for the logits


def test_failed_sample_round_trips_through_a_file(tmp_path):
    sample = Sample(prompt_index=3, prompt="1+2=", completion="3", prompt_ids=[1, 2, 3], completion_ids=[4, 0],
                    logprobs=torch.tensor([-0.25, -1.0]), policy_version=5, fields={"answer": "3"}, seed=123)
    failed = FailedSample(sample=sample, token_position=1, temperature=0.7, step=6, sample_index=9, replica=1,
                          trainer_logprobs=torch.tensor([-0.25, -1.5]))
    failed.save(str(tmp_path / "f.pt"))
    back = FailedSample.load(str(tmp_path / "f.pt"))
    assert torch.equal(back.sample.logprobs, sample.logprobs) and torch.equal(back.trainer_logprobs, failed.trainer_logprobs)
    back.sample.logprobs = back.trainer_logprobs = failed.trainer_logprobs = sample.logprobs = None
    assert back == failed
    with pytest.raises(FileNotFoundError, match="never halted"):
        FailedSample.load(str(tmp_path / "missing.pt"))


# --- the real sides, in this process ------------------------------------------------------


class _Async:
    """An in-process Generator / Trainer as a loop handle (async methods); `calls` lists the
    methods called through it."""

    def __init__(self, obj):
        self._obj = obj
        self.calls = []

    def __getattr__(self, name):
        async def call(*args, **kwargs):
            self.calls.append(name)
            result = getattr(self._obj, name)(*args, **kwargs)
            return await result if asyncio.iscoroutine(result) else result

        return call


@pytest.fixture(scope="module")
def sides(tmp_path_factory):
    model_cfg = ModelConfig(path=str(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))))
    generator = Generator(model_cfg, GeneratorConfig(num_samples=3, max_tokens=4, temperature=TEMPERATURE))
    trainer = Trainer(model_cfg, TrainerConfig(micro_batch_size=5))
    return generator, trainer


def _handles(generator, trainer):
    reward = FakeReward([], RewardRunner([(lambda prompt, completion, **f: float(len(completion)), 1.0)]))
    return Handles(generators=[_Async(generator)], trainer=_Async(trainer), reward=reward)


def _trainer_state(trainer) -> dict:
    """Every weight and optimizer tensor of the trainer, copied."""
    state = {f"param/{n}": p.detach().clone() for n, p in trainer.scorer.named_parameters()}
    for k, v in trainer.optimizers.state_dict().items():
        state[f"optim/{k}"] = v.clone() if torch.is_tensor(v) else v
    return state


PROMPTS = ["1+2=", "3+3=", "4+0=", "2+2="]


def test_healthy_sample_audit_reports_no_difference(sides):
    generator, trainer = sides
    sample = generator.generate(PROMPTS[:2], [{}, {}], 0)[4]
    failed = FailedSample(sample=sample, token_position=len(sample.completion_ids) - 1, temperature=TEMPERATURE)
    report = asyncio.run(run_audit([_Async(generator)], _Async(trainer), failed))
    assert report.divergence is None and report.module is None
    assert report.generator_reproduced and report.trainer_reproduced is None
    assert report.num_modules >= 2 * 11 + 3  # per layer 11 modules, plus embedding, norm, lm_head
    assert report.num_positions == len(sample.prompt_ids) + len(sample.completion_ids) - 1
    assert "no difference" in report.summary()


@pytest.mark.parametrize("weight, module", [
    ("layers.1.ffn_norm.weight", "layers.1.ffn_norm"),
    ("layers.0.attention.wv.weight", "layers.0.attention.qkv"),  # q, k and v in one projection
    ("tok_embeddings.weight", "tok_embeddings"),  # token ids compare by value (vLLM's are int32)
])
def test_strict_halts_and_the_audit_names_the_perturbed_module(sides, weight, module):
    generator, trainer = sides
    generator.perturb_weight(weight)  # +1 ulp on the generator only
    before = _trainer_state(trainer)
    try:
        handles = _handles(generator, trainer)
        with pytest.raises(BarrierError, match="step 1: barrier") as e:
            asyncio.run(run_step(handles, PROMPTS, [{}] * 4, 0, barrier="strict",
                                 temperature=TEMPERATURE, step=1))
        # one training forward + backward, its gradients dropped: no scoring pass, no optimizer step
        assert handles.trainer.calls == ["forward_backward", "drop_gradients"]
        assert trainer.version == 0 and trainer.step == 0
        after = _trainer_state(trainer)
        assert after.keys() == before.keys()
        for key, value in before.items():
            assert torch.equal(after[key], value) if torch.is_tensor(value) else after[key] == value, key
        assert all(p.grad is None or not p.grad.any() for p in trainer.scorer.parameters())
        failed = e.value.failed
        mismatch = e.value.report.first_mismatch
        assert (failed.sample_index, failed.token_position) == (mismatch.sample_index, mismatch.position)
        report = asyncio.run(run_audit([_Async(generator)], _Async(trainer), failed))
    finally:
        generator.perturb_weight(weight, ulps=-1)
    d = report.divergence
    assert d.module == module and d.position == 0  # from the first prompt token on
    assert d.inputs_equal and d.num_differing > 0
    assert report.generator_reproduced and report.trainer_reproduced
    text = report.summary()
    assert f"first difference: {module}" in text and "itself computes differently" in text

    # Undone, the same sample audits clean; the re-run no longer matches the step's logprobs.
    after = asyncio.run(run_audit([_Async(generator)], _Async(trainer), failed))
    assert after.divergence is None and not after.generator_reproduced
