"""Reward functions of the built-in tasks: `fn(prompt, completion, **fields) -> float`."""

import re

_LEADING_NUMBER = re.compile(r"(\d+)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def arithmetic(prompt: str, completion: str, answer: str, **_) -> float:
    """1.0 for exactly the answer; partial credit so a randomly initialised model gets signal.

    The answer followed by anything else earns 0.5; another number, off by d, earns
    0.25 * max(0, 1 - d / 10). Numbers with leading zeros ("007") earn nothing.
    """
    text = completion.strip()
    if text == answer:
        return 1.0
    m = _LEADING_NUMBER.match(text)
    if m is None or (len(m.group(1)) > 1 and m.group(1).startswith("0")):
        return 0.0
    if m.group(1) == answer:
        return 0.5
    return 0.25 * max(0.0, 1.0 - abs(int(m.group(1)) - int(answer)) / 10)


def gsm8k(prompt: str, completion: str, answer: str, **_) -> float:
    """1.0 when the last number in the completion equals the reference answer."""
    numbers = _NUMBER.findall(completion)
    if not numbers:
        return 0.0
    last = numbers[-1].replace(",", "").rstrip(".")
    try:
        return 1.0 if float(last) == float(answer) else 0.0
    except ValueError:
        return 0.0
