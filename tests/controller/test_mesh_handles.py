"""How Session talks to real Monarch meshes: rank-0 answers, strided reward merge, clear errors."""

import asyncio
import time

import monarch.actor
import pytest
from monarch.actor import this_host

from lockstep.actors.reward import RewardActor, RewardConfig, RewardError, RewardFunctionConfig, pack
from lockstep.actors.types import Sample
from lockstep.controller import session


def _sample(completion):
    import torch

    return Sample(prompt_index=0, prompt="1+1=", completion=completion, prompt_ids=[1], completion_ids=[2],
                  logprobs=torch.zeros(1), policy_version=0, fields={"answer": "2"})


def test_reward_handle_merges_ranks_and_surfaces_errors(monkeypatch):
    monkeypatch.setattr(monarch.actor, "unhandled_fault_hook", session._report_failure)

    async def main():
        procs = this_host().spawn_procs(per_host={"procs": 2})
        try:
            good = procs.spawn("good", RewardActor, RewardConfig(functions=[
                RewardFunctionConfig(fn="lockstep.controller.rewards:arithmetic")], timeout_s=2.0, workers=1))
            handle = session._RewardHandle(good, "reward")
            scores = await handle.score([_sample(c) for c in ["2", "x", "2", "2 ", "9"]])
            assert scores.values == [1.0, 0.0, 1.0, 1.0, pytest.approx(0.25 * 0.3)] and scores.num_timeouts == 0
            # an error raised inside an endpoint comes back as itself, not wrapped
            await handle._call("set_functions", pack([(lambda p, c, **f: 1 / 0, 1.0)]))
            with pytest.raises(RewardError, match="ZeroDivisionError"):
                await handle.score([_sample("2")])
            # a reward that hangs: one line naming it and the sample once reward.timeout_s has passed
            await handle._call("set_functions", pack([(lambda p, c, **f: time.sleep(600 if c == "9" else 0) or 1.0, 1.0)]))
            with pytest.raises(RewardError, match=r"^reward function .*<lambda> on sample 2 \(prompt '1\+1=', "
                                                  r"completion '9'\) ran past reward.timeout_s=2 s; the step was not applied"):
                await handle.score([_sample(c) for c in ["2", "x", "9"]])

            # an actor whose __init__ raises: its calls fail with one clear line, the process lives
            bad = procs.spawn("bad", RewardActor, RewardConfig(functions=[RewardFunctionConfig(fn="no.such:fn")]))
            with pytest.raises(session.MeshError, match=r"^the reward actors failed: ValueError: reward function 'no.such:fn': cannot import"):
                await session._RewardHandle(bad, "reward").score([_sample("2")])
        finally:
            await procs.stop()

    asyncio.run(main())
