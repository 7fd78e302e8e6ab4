"""Reward functions of the built-in tasks: `fn(prompt, completion, **fields) -> float`."""

import re

_LEADING_NUMBER = re.compile(r"\s*(-?\d+)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def arithmetic(prompt: str, completion: str, answer: str, **_) -> float:
    """1.0 for exactly the answer; partial credit so a randomly initialised model gets signal.

    Shaping, highest that applies: answer followed by junk 0.5; right first digit 0.2
    (+0.1 with the right number of digits); any leading number 0.1; else 0.
    """
    text = completion.strip()
    if text == answer:
        return 1.0
    m = _LEADING_NUMBER.match(text)
    if m is None:
        return 0.0
    number = m.group(1)
    if number == answer:
        return 0.5
    if number[0] == answer[0]:
        return 0.3 if len(number) == len(answer) else 0.2
    return 0.1


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
