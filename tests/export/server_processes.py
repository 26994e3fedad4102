"""What a tritonserver leaves on the machine, read from /proc (export/procfs.py) and /dev/shm by the
serving tests."""

import time
from pathlib import Path

from export import procfs


def group(pgid: int) -> list[int]:
    """Live processes of the process group `pgid` (the server and its backend stubs)."""
    stats = {pid: procfs.stat(pid) for pid in procfs.pids()}
    return [
        pid
        for pid, s in stats.items()
        if s is not None and s.pgrp == pgid and s.state not in procfs.DEAD_STATES
    ]


def wait_gone(pgid: int, timeout_s: float = 60) -> list[int]:
    """The group's live processes once it is empty, or when `timeout_s` has passed."""
    deadline = time.monotonic() + timeout_s
    while group(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return group(pgid)


def regions(prefix: str) -> list[str]:
    """Shared-memory regions whose names start with `prefix`."""
    return [p.name for p in Path("/dev/shm").glob(f"{prefix}*")]
