"""Actor meshes as plain objects with async methods, the way controller/loop.py calls them.

A call goes to every rank of the mesh (or of one generator replica) and rank 0's answer is
returned (the reward mesh merges its ranks' strides). Each call has its phase's limit
(`loop.timeouts.<phase>`); past it, each rank is asked a cheap question (`version`) to find
the ones still busy, and the error names role, rank and phase in one line. A dead actor
(its process killed, its __init__ raised) is a MeshError naming the same.
"""

import asyncio
import re
import sys
from typing import Callable

from monarch._rust_bindings.monarch_hyperactor.supervision import SupervisionError
from monarch.actor import ActorError

from lockstep.actors.reward import Scores, merge_scores
from lockstep.actors.types import Sample
from lockstep.controller.config import PHASES, TimeoutsConfig
from lockstep.controller.mesh_config import ROLES


class MeshError(RuntimeError):
    """An actor of a role died (its process is gone, or its __init__ raised)."""


class ActorTimeout(RuntimeError):
    """An actor did not answer within its phase's limit (loop.timeouts)."""


# The phase whose limit applies to each endpoint; any other endpoint is "control".
ENDPOINT_PHASES = {
    "generate": "generate",
    "score": "reward",
    "logprobs": "score",
    "forward_backward": "train",
    "optimizer_step": "train",
    "drop_gradients": "train",
    "train_step": "train",
    "push_weights": "sync",
    "update_weights": "sync",
    "fingerprint": "sync",
    "save": "checkpoint",
    "load": "checkpoint",
    "export_hf": "checkpoint",
    "audit": "audit",
}
assert set(ENDPOINT_PHASES.values()) <= set(PHASES)

_EXCEPTION_LINE = re.compile(r"^\s*([\w.]+(?:Error|Exception)\b.*)$", re.MULTILINE)
_ACTOR_RANK = re.compile(r"\{'\w+': (\d+)/\d+\}")  # Monarch names a failed actor as name{'procs': 1/3}
_PROBE_S = 10.0  # how long a rank may take to answer `version` before it counts as busy


def failure_line(e: BaseException) -> str:
    """One line of a dead actor's SupervisionError: the last exception line in it, else its
    last line (e.g. "the process this actor was running on failed: Killed(sig=9)")."""
    text = str(e)
    found = _EXCEPTION_LINE.findall(text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (found[-1] if found else lines[-1] if lines else type(e).__name__).strip().rstrip(":")


def report_failure(failure) -> None:
    """Monarch's unhandled-fault hook while a session runs: one line per failed role mesh
    instead of interrupting the main thread (or a notebook's kernel); calls on it raise MeshError."""
    role = failure.mesh_name.split("-")[0]
    if role in ROLES:
        sys.stderr.write(f"lockstep: an actor of the {role} mesh failed; calls on it raise MeshError\n")


class MeshHandle:
    """An actor mesh (one flat dim) as one object whose async methods are its endpoints.

    `probe`: a cheap endpoint every rank answers between calls (none: a timeout names the
    role's ranks as a group).
    """

    def __init__(self, mesh, name: str, timeouts: TimeoutsConfig | None = None, probe: str | None = "version"):
        self._mesh, self.name, self._probe = mesh, name, probe
        self._timeouts = timeouts or TimeoutsConfig()
        ((self._dim, self.num_ranks),) = mesh.sizes.items()

    def __getattr__(self, endpoint: str) -> Callable:
        if endpoint.startswith("_"):
            raise AttributeError(endpoint)

        async def call(*args, **kwargs):
            values = await self.call(endpoint, *args, **kwargs)
            return values[0]

        return call

    async def call(self, endpoint: str, *args, phase: str | None = None, **kwargs) -> list:
        """Call `endpoint` on every rank; their answers in rank order. Raises the endpoint's
        own error, MeshError for a dead actor, ActorTimeout past the phase's limit."""
        phase = phase or ENDPOINT_PHASES.get(endpoint, "control")
        limit = self._timeouts.seconds(phase)
        try:
            result = await asyncio.wait_for(getattr(self._mesh, endpoint).call(*args, **kwargs), limit)
        except asyncio.TimeoutError:
            raise ActorTimeout(
                f"{self.name} {await self._busy_ranks()} did not answer {endpoint} within {limit:g} s (phase {phase}); "
                f"if it is only slow, raise loop.timeouts.{phase}"
            ) from None
        except ActorError as e:
            if isinstance(e.exception, Exception):
                raise e.exception from e
            raise
        except SupervisionError as e:
            match = _ACTOR_RANK.search(str(e))
            rank = f"rank {match.group(1)}" if match else f"({self.num_ranks} ranks)"
            raise MeshError(f"{self.name} {rank} failed during {endpoint} (phase {phase}): {failure_line(e)}") from e
        return [v for _, v in sorted(result.items(), key=lambda item: item[0].rank)]

    async def _busy_ranks(self) -> str:
        """'rank 1' / 'ranks 0, 1': those that do not answer the probe (still in the call)."""
        everyone = "rank 0" if self.num_ranks == 1 else f"ranks 0-{self.num_ranks - 1}"
        if self._probe is None or self.num_ranks == 1:
            return everyone

        async def answers(rank: int) -> bool:
            actor = self._mesh.slice(**{self._dim: rank})
            try:
                await asyncio.wait_for(getattr(actor, self._probe).call_one(), _PROBE_S)
                return True
            except Exception:
                return False

        free = await asyncio.gather(*(answers(r) for r in range(self.num_ranks)))
        busy = [r for r, ok in enumerate(free) if not ok]
        if not busy:
            return everyone
        return f"rank {busy[0]}" if len(busy) == 1 else f"ranks {', '.join(map(str, busy))}"


class RewardHandle(MeshHandle):
    def __init__(self, mesh, name: str = "reward", timeouts: TimeoutsConfig | None = None):
        super().__init__(mesh, name, timeouts, probe=None)

    async def score(self, samples: list[Sample]) -> Scores:
        return merge_scores(await self.call("score", samples))


def generator_replicas(mesh, num_replicas: int, tp: int, timeouts: TimeoutsConfig | None = None) -> list[MeshHandle]:
    """Replica i = procs [i*tp, (i+1)*tp) of the flat generator mesh (rank = dp * tp + tp_index)."""
    (dim,) = mesh.sizes
    return [
        MeshHandle(mesh.slice(**{dim: slice(i * tp, (i + 1) * tp)}), f"generator[{i}]", timeouts)
        for i in range(num_replicas)
    ]
