"""examples/custom_reward.py: its function and class, mixed with weights as main() does."""

import asyncio
import importlib.util
from pathlib import Path

import torch

from lockstep.actors.reward_runner import RewardConfig, RewardRunner
from lockstep.actors.types import Sample
from lockstep.controller.config import load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_reward.py"


def sample(completion: str, answer: str = "7") -> Sample:
    return Sample(prompt_index=0, prompt="3+4=", completion=completion, prompt_ids=[1], completion_ids=[2],
                  logprobs=torch.zeros(1), policy_version=0, fields={"answer": answer})


def test_function_and_class_from_the_example_sum_with_weights():
    spec = importlib.util.spec_from_file_location("custom_reward_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    runner = RewardRunner([(example.exact_and_short, 1.0), (example.StartsWithAnswer, 0.5, {"partial": 0.25})],
                          RewardConfig(workers=1))

    async def main():
        try:
            return await runner.score([sample("7"), sample("7+"), sample("12"), sample(" 7 ")])
        finally:
            runner.close()

    assert asyncio.run(main()).values == [1.0 + 0.5, 1.0 - 0.1 + 0.5 * 0.25, -0.1, 1.0 + 0.5]


def test_the_command_line_form_in_its_docstring_parses():
    cfg = load_config(None, ["reward.functions=[examples/custom_reward.py:exact_and_short, "
                             "{fn: examples/custom_reward.py:StartsWithAnswer, weight: 0.5, args: {partial: 0.25}}]"])
    assert [(f.fn, f.weight, f.args) for f in cfg.reward.functions] == [
        ("examples/custom_reward.py:exact_and_short", 1.0, {}),
        ("examples/custom_reward.py:StartsWithAnswer", 0.5, {"partial": 0.25}),
    ]
    RewardRunner.from_config(cfg.reward)  # resolves both (from the repo root) and checks the args
