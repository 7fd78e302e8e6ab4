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
