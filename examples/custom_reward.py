"""Custom rewards on the built-in arithmetic task: a function and a batched class, with weights.

    python examples/custom_reward.py [--steps 10]

A reward function is any `fn(prompt, completion, **fields) -> float` (sync or async); the
dataset's columns arrive as keyword arguments, here the arithmetic task's `answer`. Sync
functions run in worker processes, so slow checks run side by side.

A reward class is built once on each reward proc, with its `args` (load a model, open a
sandbox), and its `__call__(prompts, completions, **fields)` scores a whole batch at once,
each column a list. examples/reward_model.py is one with a learned model inside.

The same rewards work from the command line, by path:

    python controller/main.py reward.functions=examples/custom_reward.py:exact_and_short
    python controller/main.py reward.functions='[examples/custom_reward.py:exact_and_short,
        {fn: examples/custom_reward.py:StartsWithAnswer, weight: 0.5, args: {partial: 0.25}}]'
"""

import argparse

from lockstep import Session


def exact_and_short(prompt: str, completion: str, answer: str, **fields) -> float:
    """1 for the exact answer, minus a little for every extra character."""
    text = completion.strip()
    extra = max(len(text) - len(answer), 0)
    return (1.0 if text.startswith(answer) else 0.0) - 0.1 * extra


class StartsWithAnswer:
    """1 for the answer alone, `partial` for the answer followed by anything else."""

    def __init__(self, partial: float = 0.5):
        self.partial = partial

    def __call__(self, prompts: list[str], completions: list[str], answer: list[str], **fields) -> list[float]:
        texts = [c.strip() for c in completions]
        return [1.0 if t == a else self.partial if t.startswith(a) else 0.0 for t, a in zip(texts, answer)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    with Session(mesh="local-cpu") as session:
        # (function or class, weight[, the class's constructor args]), summed per sample
        session.set_reward([(exact_and_short, 1.0), (StartsWithAnswer, 0.5, {"partial": 0.25})])
        session.run(args.steps)
        print("mean reward per step:", [round(m["reward/mean"], 3) for m in session.metrics])
        for sample in session.generate("3+4=", n=4):
            print(repr(sample.prompt), "->", repr(sample.completion))


if __name__ == "__main__":
    main()
