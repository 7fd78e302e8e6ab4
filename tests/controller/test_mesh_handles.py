"""How Session talks to real Monarch meshes: rank-0 answers, strided reward merge, clear
errors, per-phase timeouts naming the rank, a killed proc naming the rank."""

import asyncio
import os
import signal
import sys
import time

import cloudpickle
import monarch.actor
import pytest
from monarch.actor import Actor, current_rank, endpoint, this_host

from lockstep.actors.reward import RewardActor, RewardConfig, RewardError, RewardFunctionConfig, pack
from lockstep.actors.types import Sample
from lockstep.controller import handles
from lockstep.controller.config import TimeoutsConfig

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the procs cannot import this module


class Sleeper(Actor):
    """A rank that sleeps in `work` stays busy: its `version` (the probe) waits behind it."""

    @endpoint
    async def work(self, seconds_by_rank: dict) -> int:
        await asyncio.sleep(seconds_by_rank.get(current_rank().rank, 0))
        return current_rank().rank

    @endpoint
    async def version(self) -> int:
        return 0

    @endpoint
    async def pid(self) -> int:
        return os.getpid()


def _sample(completion):
    import torch

    return Sample(prompt_index=0, prompt="1+1=", completion=completion, prompt_ids=[1], completion_ids=[2],
                  logprobs=torch.zeros(1), policy_version=0, fields={"answer": "2"})


def test_reward_handle_merges_ranks_and_surfaces_errors(monkeypatch):
    monkeypatch.setattr(monarch.actor, "unhandled_fault_hook", handles.report_failure)

    async def main():
        procs = this_host().spawn_procs(per_host={"procs": 2})
        try:
            good = procs.spawn("good", RewardActor, RewardConfig(functions=[
                RewardFunctionConfig(fn="lockstep.controller.rewards:arithmetic")], timeout_s=2.0, workers=1))
            handle = handles.RewardHandle(good, "reward")
            scores = await handle.score([_sample(c) for c in ["2", "x", "2", "2 ", "9"]])
            assert scores.values == [1.0, 0.0, 1.0, 1.0, pytest.approx(0.25 * 0.3)] and scores.num_timeouts == 0
            # an error raised inside an endpoint comes back as itself, not wrapped
            await handle.call("set_functions", pack([(lambda p, c, **f: 1 / 0, 1.0)]))
            with pytest.raises(RewardError, match="ZeroDivisionError"):
                await handle.score([_sample("2")])
            # a reward that hangs: one line naming it and the sample once reward.timeout_s has passed
            await handle.call("set_functions", pack([(lambda p, c, **f: time.sleep(600 if c == "9" else 0) or 1.0, 1.0)]))
            with pytest.raises(RewardError, match=r"^reward function .*<lambda> on sample 2 \(prompt '1\+1=', "
                                                  r"completion '9'\) ran past reward.timeout_s=2 s; the step was not applied"):
                await handle.score([_sample(c) for c in ["2", "x", "9"]])

            # an actor whose __init__ raises: its calls fail with one clear line, the process lives
            bad = procs.spawn("bad", RewardActor, RewardConfig(functions=[RewardFunctionConfig(fn="no.such:fn")]))
            with pytest.raises(handles.MeshError, match=r"^reward rank \d failed during score \(phase reward\): "
                                                         r"ValueError: reward function 'no.such:fn': cannot import"):
                await handles.RewardHandle(bad, "reward").score([_sample("2")])
        finally:
            await procs.stop()

    asyncio.run(main())


def test_a_hung_rank_is_named_and_a_killed_proc_is_named(monkeypatch, proc_gone):
    monkeypatch.setattr(monarch.actor, "unhandled_fault_hook", handles.report_failure)
    # The hung rank's probe waits all of this; an idle rank answers in milliseconds.
    monkeypatch.setattr(handles, "_PROBE_S", 4.0)

    async def main():
        procs = this_host().spawn_procs(per_host={"procs": 3}, name="trainer")
        try:
            mesh = procs.spawn("trainer", Sleeper)
            trainer = handles.MeshHandle(mesh, "trainer", TimeoutsConfig(train=3.0))
            assert await trainer.call("work", {}, phase="start") == [0, 1, 2]
            pids = await trainer.call("pid", phase="start")
            # rank 1 hangs in a train-phase call: the limit is loop.timeouts.train
            with pytest.raises(handles.ActorTimeout, match=r"^trainer rank 1 did not answer work within 3 s \(phase train\); "
                                                         r"if it is only slow, raise loop.timeouts.train$"):
                await trainer.call("work", {1: 600}, phase="train")
            # the hung rank's proc is killed (no waiting for it to wake up): the next call names it
            os.kill(pids[1], signal.SIGKILL)
            with pytest.raises(handles.MeshError, match=r"^trainer rank 1 failed during work \(phase control\): "
                                                      r".*Killed\(sig=9\)$") as e:
                await trainer.call("work", {})
            assert "\n" not in str(e.value)
            return pids
        finally:
            try:
                await procs.stop()
            except Exception:
                pass  # one proc is already gone

    pids = asyncio.run(main())
    assert all(proc_gone(pid) for pid in pids)
