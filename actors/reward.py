"""The reward role: `RewardActor`, a thin mesh wrapper over `reward_runner.RewardRunner`.

Rank r of the reward mesh scores samples[r::world]; the controller merges the ranks back
with `merge_scores`. Reward classes are built once per proc, when the actor starts (a
constructor that raises fails the first `score`, and `set_functions` can replace it).
On a mesh that gives the reward role GPUs (`reward: {procs, gpus}`), each proc sees only
its own `gpus` of them, so a reward model simply uses "cuda". The reward API itself
(functions, classes, configs, timeouts) is documented in `reward_runner`.
"""

import math
import os

from monarch.actor import Actor, current_rank, current_size, endpoint

from lockstep.actors.reward_runner import (
    RewardConfig,
    RewardError,
    RewardFunctionConfig,
    RewardRunner,
    RewardTimeoutWarning,
    Scores,
    merge_scores,
    merge_strided,
    pack,
    resolve,
)
from lockstep.actors.types import Sample

__all__ = [
    "RewardActor", "RewardConfig", "RewardError", "RewardFunctionConfig", "RewardRunner",
    "RewardTimeoutWarning", "Scores", "merge_scores", "merge_strided", "pack", "resolve", "own_gpus",
]


def own_gpus(visible: str, local_rank: int, procs_on_host: int) -> str:
    """This proc's slice of the reward role's GPUs on its host ("4,5,6,7", rank 1 of 2 -> "6,7")."""
    ids = [i for i in visible.split(",") if i]
    if not ids:
        return visible
    if len(ids) % procs_on_host:
        raise ValueError(f"{len(ids)} reward GPUs do not split over {procs_on_host} reward procs")
    per_proc = len(ids) // procs_on_host
    return ",".join(ids[local_rank * per_proc:(local_rank + 1) * per_proc])


class RewardActor(Actor):
    """Every rank gets all samples and scores its stride."""

    def __init__(self, reward_cfg: RewardConfig):
        if os.environ.get("CUDA_VISIBLE_DEVICES"):  # before anything touches CUDA
            os.environ["CUDA_VISIBLE_DEVICES"] = own_gpus(
                os.environ["CUDA_VISIBLE_DEVICES"], int(os.environ.get("LOCAL_RANK", 0)),
                int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
            )
        self.settings = reward_cfg
        self._use(RewardRunner.from_config(reward_cfg))

    def _use(self, runner: RewardRunner) -> None:
        self.runner, self.setup_error = runner, None
        try:
            runner.setup()  # build the reward classes, start the workers
        except RewardError as e:
            self.setup_error = e

    @endpoint
    async def score(self, samples: list[Sample]) -> Scores:
        if self.setup_error is not None:
            raise self.setup_error
        rank = current_rank().rank
        world = math.prod(current_size().values())
        indices = list(range(rank, len(samples), world))
        return await self.runner.score(samples[rank::world], indices)

    @endpoint
    async def set_functions(self, functions: list[tuple]) -> None:
        """`functions` as made by `pack`: [(fn, weight[, args])]; timeouts and workers stay."""
        old = self.runner
        self._use(RewardRunner(functions, self.settings))
        old.close()
