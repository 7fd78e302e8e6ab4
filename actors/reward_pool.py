"""Worker processes that run sync reward functions, one sample at a time each.

CPU-bound checkers (regexes, math verifiers, code runners) hold the GIL, so threads would
run them one after another; `num_workers` processes per reward proc run them side by side,
and a worker that runs past its sample's time limit is killed with everything it started
(its own process group), then replaced. Each worker is `python -m lockstep.actors.reward_pool`
talking over its stdin/stdout in length-prefixed pickles:

    pool -> worker   the functions, once, as `reward_runner.pack` makes them
    worker -> pool   ("ok",) when they loaded, or ("error", message)
    pool -> worker   (function index, prompt, completion, fields), one per sample
    worker -> pool   ("ok", score) | ("raised", exception type, message) | ("bad", repr of the value)

The pool side blocks only in its own threads, so one pool serves any event loop.
This module imports only the standard library and cloudpickle: workers start in ~0.1 s.
"""

import asyncio
import concurrent.futures
import math
import numbers
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref

STARTUP_TIMEOUT_S = 120.0  # a worker importing its functions (they may import torch, sympy, ...)
_HEADER = struct.Struct(">Q")  # payload length in bytes


class WorkerDied(RuntimeError):
    """The worker process exited while running a sample (a crash, os._exit, the OOM killer)."""


class WorkerStartError(RuntimeError):
    """A worker could not load the functions (an import failed or took too long)."""


def _send(stream, message) -> None:
    data = pickle.dumps(message)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _read_exactly(stream, num_bytes: int) -> bytes:
    chunks = []
    while num_bytes:
        chunk = stream.read(num_bytes)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        num_bytes -= len(chunk)
    return b"".join(chunks)


def _recv(stream):
    (length,) = _HEADER.unpack(_read_exactly(stream, _HEADER.size))
    return pickle.loads(_read_exactly(stream, length))


def as_score(value) -> float | None:
    """A finite real (bools and ints count) as float, else None."""
    if isinstance(value, numbers.Real) and math.isfinite(float(value)):
        return float(value)
    return None


def describe_value(value) -> str:
    text = repr(value)
    return f"{text if len(text) <= 80 else text[:80] + '...'} ({type(value).__name__})"


class _Worker:
    def __init__(self, functions: list, threads: concurrent.futures.Executor):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        # Own process group: a timeout kills the function's own subprocesses too.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lockstep.actors.reward_pool"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, start_new_session=True,
        )
        self.started = threads.submit(self._handshake, functions)  # a concurrent.futures.Future

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _handshake(self, functions: list) -> None:
        try:
            _send(self.proc.stdin, functions)
            reply = _recv(self.proc.stdout)
        except (EOFError, OSError):
            raise WorkerStartError(
                f"the worker exited while loading the functions ({_exit_status(self.proc.wait())})"
            ) from None
        if reply[0] != "ok":
            raise WorkerStartError(reply[1])

    def request(self, message) -> tuple:
        """Blocking: one sample in, its reply out (runs in a pool thread)."""
        try:
            _send(self.proc.stdin, message)
            return _recv(self.proc.stdout)
        except (EOFError, BrokenPipeError):
            raise WorkerDied(_exit_status(self.proc.wait())) from None

    def kill(self) -> None:
        """The worker and whatever its function started (its process group)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # already gone
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


def _exit_status(code: int) -> str:
    if code < 0:
        return f"killed by signal {signal.Signals(-code).name}"
    return f"exit code {code}"


class WorkerPool:
    """`num_workers` worker processes for `functions` (a list made by `reward_runner.pack`)."""

    def __init__(self, functions: list, num_workers: int):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.functions, self.num_workers = functions, num_workers
        # Two threads per worker: a killed worker's thread may still be unwinding.
        self._threads = concurrent.futures.ThreadPoolExecutor(2 * num_workers, thread_name_prefix="reward-pool")
        self._idle: list[_Worker] = []
        self._slots: asyncio.Semaphore | None = None
        self._loop = None
        # Idle workers hold nothing: close() kills them, and so does garbage collection.
        self._finalizer = weakref.finalize(self, _stop, self._idle, self._threads)

    def start(self) -> None:
        """Start every worker now (in the background), so later calls do not wait for imports."""
        while len(self._idle) < self.num_workers:
            self._idle.append(_Worker(self.functions, self._threads))

    def _slots_for_this_loop(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # asyncio primitives belong to one loop; workers do not
            self._loop, self._slots = loop, asyncio.Semaphore(self.num_workers)
        return self._slots

    async def call(self, index: int, prompt: str, completion: str, fields: dict, timeout_s: float | None) -> tuple:
        """Runs function `index` on one sample in a free worker; returns the worker's reply.

        Raises TimeoutError after `timeout_s` of running (startup is not counted), WorkerDied,
        or WorkerStartError. A worker that did not answer is killed (also on cancellation)."""
        if not self._finalizer.alive:
            raise RuntimeError("the reward worker pool is closed")
        async with self._slots_for_this_loop():
            worker = self._idle.pop() if self._idle else _Worker(self.functions, self._threads)
            answered = False
            try:
                await asyncio.wait_for(asyncio.wrap_future(worker.started), STARTUP_TIMEOUT_S)
                future = self._threads.submit(worker.request, (index, prompt, completion, fields))
                reply = await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
                answered = True
                return reply
            except asyncio.TimeoutError:
                if not worker.started.done():
                    raise WorkerStartError(f"the worker took over {STARTUP_TIMEOUT_S:.0f} s to load the functions") from None
                raise TimeoutError from None
            finally:
                if answered:
                    self._idle.append(worker)
                else:
                    worker.kill()  # still running the sample, or dead: never reuse it

    def pids(self) -> list[int]:
        """The idle workers' process ids (for tests and debugging)."""
        return [w.pid for w in self._idle]

    def close(self) -> None:
        self._finalizer()


def _stop(idle: list[_Worker], threads: concurrent.futures.Executor) -> None:
    while idle:
        idle.pop().kill()
    threads.shutdown(wait=False, cancel_futures=True)


# -- the worker process --


def _exit_when_orphaned(parent_pid: int) -> None:
    """The reward proc may die without closing our stdin cleanly (SIGKILL): then go too,
    taking the function's own subprocesses with us."""
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def _run(function, prompt: str, completion: str, fields: dict) -> tuple:
    import inspect

    try:
        value = function(prompt, completion, **fields)
        if inspect.isawaitable(value):
            value = asyncio.run(_await(value))
    except Exception as e:
        return ("raised", type(e).__name__, str(e))
    score = as_score(value)
    return ("ok", score) if score is not None else ("bad", describe_value(value))


async def _await(awaitable):
    return await awaitable


def _worker_main() -> None:
    # The reply channel is a private copy of stdout; fd 1 becomes stderr (a function's
    # print shows in the reward proc's log) and fd 0 /dev/null (only we read our stdin).
    replies = os.fdopen(os.dup(1), "wb")
    requests = os.fdopen(os.dup(0), "rb")
    os.dup2(2, 1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    _exit_when_orphaned(os.getppid())

    from lockstep.actors.reward_runner import load_packed

    try:
        functions = [load_packed(spec) for spec in _recv(requests)]
    except EOFError:
        return
    except Exception as e:
        _send(replies, ("error", f"{type(e).__name__}: {e}"))
        return
    _send(replies, ("ok",))
    while True:
        try:
            index, prompt, completion, fields = _recv(requests)
        except EOFError:
            return  # the pool closed us
        _send(replies, _run(functions[index], prompt, completion, fields))


if __name__ == "__main__":
    _worker_main()
