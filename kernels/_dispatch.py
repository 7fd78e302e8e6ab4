"""How an op is called: the registered custom op, or the same function directly; and, on CUDA,
a Triton function if one exists, else the reference."""

import importlib
from typing import Callable

import torch
from torch import Tensor

_cache: dict[tuple[str, str], Callable | None] = {}
_PLAIN = (Tensor, torch.nn.Parameter)


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


def _dispatch_modes_active() -> bool:
    stack_len = getattr(torch._C, "_len_torch_dispatch_stack", None)
    return stack_len is None or stack_len() > 0


def _plain_eager(args) -> bool:
    """Real tensors (no fake, functional or DTensor subclass), no tracing, no dispatch mode."""
    if torch.compiler.is_compiling() or _dispatch_modes_active():
        return False
    return all(type(a) in _PLAIN for a in args if isinstance(a, Tensor))


class Op:
    """A `lockstep::<name>` custom op that plain eager calls skip.

    torch.compile, export, opcheck, fake tensors and tensor subclasses see the registered custom
    op (fake and autograd rules included). A plain eager call runs the same function directly,
    through a `torch.autograd.Function` built from the same setup/backward when a gradient is
    needed: the dispatcher costs tens of microseconds per call (about twice that with
    autograd), most of a training step's host time at these kernel sizes. Same bits either way
    (tests/kernels/test_dispatch.py)."""

    def __init__(self, name: str, fn: Callable, mutates_args=()):
        self.name = name
        self.fn = fn
        self.custom = torch.library.custom_op(f"lockstep::{name}", fn, mutates_args=mutates_args)
        self.function: type[torch.autograd.Function] | None = None

    def register_fake(self, fn: Callable) -> Callable:
        self.custom.register_fake(fn)
        return fn

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        self.custom.register_autograd(backward, setup_context=setup_context)
        fn = self.fn

        def forward(ctx, *args):
            # setup_context runs inside forward: a Function with a separate setup_context
            # costs an inspect.signature per call (more than the dispatcher saved).
            output = fn(*args)
            setup_context(ctx, args, output)
            return output

        self.function = type(f"{self.name}_eager", (torch.autograd.Function,),
                             dict(forward=staticmethod(forward), backward=staticmethod(backward)))

    def __call__(self, *args):
        if not _plain_eager(args):
            return self.custom(*args)
        if not (torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)):
            return self.fn(*args)
        # An op without a backward keeps the custom op's own answer to a gradient request.
        return self.custom(*args) if self.function is None else self.function.apply(*args)


def op(name: str, mutates_args=()) -> Callable[[Callable], Op]:
    """Decorator: `@op("linear")` on the implementation registers `lockstep::linear`."""
    return lambda fn: Op(name, fn, mutates_args)
