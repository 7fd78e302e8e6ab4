import multiprocessing
import os
import time

import pytest


def _gone(pid: int, timeout_s: float = 20.0) -> bool:
    """True once process `pid` has exited (or is a zombie) within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z":
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="session")
def proc_gone():
    """Tests that spawn Monarch procs check with this that none is left behind."""
    return _gone


@pytest.fixture(scope="session")
def tb_scalars():
    """run_dir -> {tag: [value per step, in step order]} of its TensorBoard scalars."""

    def read(run_dir) -> dict[str, list[float]]:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
        events.Reload()
        return {tag: [e.value for e in sorted(events.Scalars(tag), key=lambda e: e.step)] for tag in events.Tags()["scalars"]}

    return read


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (e.g. Monarch workers of simulated hosts, and their procs)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


@pytest.fixture(scope="session")
def descendants():
    """descendants(pid): the processes a run started, to check with proc_gone that none outlives it."""
    return _descendants


@pytest.fixture(scope="session")
def spawn():
    """spawn(fn, args, nprocs): torch.multiprocessing.spawn (fn(rank, *args) in nprocs procs,
    joined, a failure re-raised), but forked from one server that imported torch and TorchTitan
    once, instead of a fresh interpreter per proc importing them again. Nothing that imports
    Monarch is preloaded: its runtime's threads do not survive a fork."""
    import torch.multiprocessing as mp

    multiprocessing.set_forkserver_preload(["torch", "torch.distributed.fsdp", "torch.distributed.tensor",
                                            "torchtitan.models"])

    def run(fn, args, nprocs):
        mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="forkserver")

    return run
