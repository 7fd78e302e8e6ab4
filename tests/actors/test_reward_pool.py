"""The worker processes behind sync reward functions: replies, crashes, kills, no leftovers."""

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from lockstep.actors.reward_pool import WorkerDied, WorkerPool, WorkerStartError
from lockstep.actors.reward_runner import pack_one


def chatty(prompt, completion, **_):
    print("a print on stdout must not reach the reply channel")
    return 2.0


def crash(prompt, completion, **_):
    os._exit(3)


def with_child(prompt, completion, pid_dir, **_):
    """Starts a subprocess of its own and hangs on it (as a code sandbox might)."""
    child = subprocess.Popen(["sleep", "600"])
    with open(os.path.join(pid_dir, "pids"), "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    child.wait()
    return 0.0


def call(pool: WorkerPool, index: int, fields=None, timeout_s=30.0):
    return pool.call(index, "1+1=", "2", fields or {}, timeout_s)


def test_replies_survive_prints_and_a_crash_is_reported():
    pool = WorkerPool([pack_one(chatty), pack_one(crash), "lockstep.controller.rewards:arithmetic"], 2)
    try:
        async def main():
            assert await call(pool, 0) == ("ok", 2.0)
            assert await call(pool, 2, {"answer": "2"}) == ("ok", 1.0)
            with pytest.raises(WorkerDied, match="exit code 3"):
                await call(pool, 1)
            assert await call(pool, 0) == ("ok", 2.0)  # the pool replaced the dead worker

        asyncio.run(main())
        asyncio.run(main())  # a second event loop uses the same workers
    finally:
        pool.close()


def test_a_timeout_kills_the_worker_and_what_it_started(tmp_path, proc_gone):
    pool = WorkerPool([pack_one(with_child)], 1)
    try:
        with pytest.raises(TimeoutError):
            asyncio.run(call(pool, 0, {"pid_dir": str(tmp_path)}, timeout_s=2.0))
        worker_pid, child_pid = map(int, (tmp_path / "pids").read_text().split())
        assert proc_gone(worker_pid) and proc_gone(child_pid)
    finally:
        pool.close()


def test_functions_that_do_not_load_in_the_worker_are_one_error():
    pool = WorkerPool(["no_such_module_here:fn"], 1)
    try:
        with pytest.raises(WorkerStartError, match="cannot import 'no_such_module_here'"):
            asyncio.run(call(pool, 0))
    finally:
        pool.close()


def test_close_and_a_dead_parent_leave_no_worker_behind(tmp_path, proc_gone):
    pool = WorkerPool([pack_one(chatty)], 2)
    pool.start()
    asyncio.run(call(pool, 0))
    pids = pool.pids()
    pool.close()
    assert len(pids) == 2 and all(proc_gone(p) for p in pids)

    # A parent killed outright (SIGKILL: no cleanup) takes its workers with it.
    script = (
        "import asyncio, sys; from lockstep.actors.reward_pool import WorkerPool\n"
        "pool = WorkerPool(['lockstep.controller.rewards:arithmetic'], 2); pool.start()\n"
        "asyncio.run(pool.call(0, '1+1=', '2', {'answer': '2'}, 60.0))\n"
        "print(*pool.pids(), flush=True); sys.stdin.read()\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    worker_pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(worker_pids) == 2
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    assert all(proc_gone(p) for p in worker_pids)
