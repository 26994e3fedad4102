"""What a tritonserver leaves on the machine, read from /proc and /dev/shm by the serving tests."""

import contextlib
import time
from pathlib import Path


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def group(pgid: int) -> list[int]:
    """Live processes of the process group `pgid` (the server and its backend stubs)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(stat.parent.name))
    return members


def wait_gone(pgid: int, timeout_s: float = 60) -> list[int]:
    """The group's live processes once it is empty, or when `timeout_s` has passed."""
    deadline = time.monotonic() + timeout_s
    while group(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return group(pgid)


def regions(prefix: str) -> list[str]:
    """Shared-memory regions whose names start with `prefix`."""
    return [p.name for p in Path("/dev/shm").glob(f"{prefix}*")]
