"""Where a CUDA tensor goes: a Triton function if one exists, else the reference."""

import importlib
from typing import Callable

_cache: dict[tuple[str, str], Callable | None] = {}


def triton_fn(module: str, name: str) -> Callable | None:
    """`lockstep.kernels.triton.<module>.<name>`, or None when it is not there (yet)."""
    key = (module, name)
    if key not in _cache:
        try:
            fn = getattr(importlib.import_module(f"lockstep.kernels.triton.{module}"), name)
        except (ImportError, AttributeError):
            fn = None
        _cache[key] = fn
    return _cache[key]
