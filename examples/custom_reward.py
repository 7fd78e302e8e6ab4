"""A custom reward function on the built-in arithmetic task.

    python examples/custom_reward.py [--steps 10]

A reward is any `fn(prompt, completion, **fields) -> float` (sync or async); the
dataset's columns arrive as keyword arguments, here the arithmetic task's `answer`.
The same function also works from the command line, by path:

    python controller/main.py reward.functions=examples/custom_reward.py:exact_and_short
"""

import argparse

from lockstep import Session


def exact_and_short(prompt: str, completion: str, answer: str, **fields) -> float:
    """1 for the exact answer, minus a little for every extra character."""
    text = completion.strip()
    extra = max(len(text) - len(answer), 0)
    return (1.0 if text.startswith(answer) else 0.0) - 0.1 * extra


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    with Session(mesh="local-cpu") as session:
        session.set_reward(exact_and_short)
        session.run(args.steps)
        print("mean reward per step:", [round(m["reward/mean"], 3) for m in session.metrics])
        for sample in session.generate("3+4=", n=4):
            print(repr(sample.prompt), "->", repr(sample.completion))


if __name__ == "__main__":
    main()
