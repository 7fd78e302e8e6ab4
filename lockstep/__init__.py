"""lockstep: on-policy RL where generator and trainer logprobs agree bit for bit."""

__all__ = ["Session"]


def __getattr__(name):
    # Lazy: `import lockstep.kernels` must not pull in Monarch or vLLM.
    if name == "Session":
        from lockstep.controller.session import Session

        return Session
    raise AttributeError(name)
