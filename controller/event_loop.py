"""The session's event loop: one asyncio loop on a daemon thread.

Every coroutine of a Session runs there, so the same object works from a plain script and
inside Jupyter, whose own loop is already running in the main thread.
"""

import asyncio
import threading


class LoopThread:
    """`run(coro)` blocks the caller until the coroutine finishes on the loop's thread."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="lockstep-session", daemon=True)
        self._thread.start()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
