"""Strict parity where the two sides batch differently on purpose: the generator samples 32
sequences of mixed lengths at once (one vLLM batch that shrinks as completions finish), the
trainer scores them in a shuffled order, in micro-batches of another size. Every completion
token's logprob must still be the same bits."""

import random

import pytest
import torch

from lockstep.actors.generator import Generator, GeneratorConfig
from lockstep.actors.trainer import Trainer, TrainerConfig
from lockstep.controller.barrier import check
from lockstep.models import ModelConfig
from lockstep.models.tiny import write_tiny_checkpoint

TEMPERATURE = 0.7
PROMPTS = [f"{a}+{b}=" for a, b in [(1, 2), (13, 4), (7, 88), (120, 5), (0, 0), (9, 9), (45, 67), (3, 1000)]]


@pytest.fixture(scope="module")
def model_cfg(tmp_path_factory):
    return ModelConfig(path=str(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))))


@pytest.fixture(scope="module")
def samples(model_cfg):
    generator = Generator(model_cfg, GeneratorConfig(num_samples=4, max_tokens=6, temperature=TEMPERATURE))
    out = generator.generate(PROMPTS, [{} for _ in PROMPTS], 0)
    assert len(out) == 32 and len({len(s.prompt_ids) for s in out}) > 2 and len({len(s.completion_ids) for s in out}) > 2
    return out


@pytest.mark.parametrize("micro_batch_size", [1, 5, 32])
def test_trainer_micro_batches_in_shuffled_order_match_the_generator_bitwise(model_cfg, samples, micro_batch_size):
    order = list(range(len(samples)))
    random.Random(micro_batch_size).shuffle(order)
    trainer = Trainer(model_cfg, TrainerConfig(micro_batch_size=micro_batch_size))
    scored = trainer.logprobs([samples[i] for i in order], TEMPERATURE)
    trainer_logprobs = [None] * len(samples)
    for i, logprobs in zip(order, scored):
        trainer_logprobs[i] = logprobs
    report = check("strict", [s.logprobs for s in samples], trainer_logprobs)  # raises on any differing bit
    assert report.num_differing_tokens == 0 and report.num_tokens == sum(len(s.completion_ids) for s in samples)
    assert all(torch.equal(s.logprobs, t) for s, t in zip(samples, trainer_logprobs))
