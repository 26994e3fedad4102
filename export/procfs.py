"""What Linux's /proc says about a process: its state, start time, command line and children.

The launcher reads other processes (the tritonserver's backend stubs, a killed launcher's leftovers)
that are not its children, so it cannot wait for them: /proc is where their life shows. A pid alone
does not name a process for long (the kernel reuses pids), so a process is (pid, start time): the
start time, in clock ticks after boot, is fixed for the life of the process and differs for any
later one that gets the same pid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
DEAD_STATES = ("Z", "X")  # zombie (exited, not yet waited for), dead


@dataclass(frozen=True)
class ProcStat:
    state: str  # R, S, D, Z, ... (proc(5))
    ppid: int  # the parent process (of a child forked by any thread: the process, not the thread)
    pgrp: int  # process group
    start: int  # clock ticks after boot
    cpu: int  # clock ticks on a CPU so far, user and system, every thread of the process


def stat(pid: int) -> ProcStat | None:
    """The process's state and start time; None when there is no such process."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or parentheses itself.
    fields = text.rsplit(")", 1)[1].split()
    return ProcStat(
        state=fields[0],
        ppid=int(fields[1]),
        pgrp=int(fields[2]),
        start=int(fields[19]),
        cpu=int(fields[11]) + int(fields[12]),  # utime + stime
    )


def running(pid: int, start: int) -> bool:
    """Whether the process that started at `start` with this pid still runs (a zombie does not)."""
    now = stat(pid)
    return now is not None and now.start == start and now.state not in DEAD_STATES


def cmdline(pid: int) -> list[str]:
    """The process's arguments; [] for a zombie, a kernel thread or a process that is gone."""
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0")[:-1]]


def pids() -> list[int]:
    """The pid of every process /proc shows."""
    return [int(p.name) for p in PROC.iterdir() if p.name.isdigit()]


def children(pid: int) -> list[int]:
    """Child pids of the process, from every process's parent pid (a read of every process's stat). Not
    from the threads' child lists (/proc/<pid>/task/<tid>/children): a child sits in the list of the
    thread that forked it, and a multi-threaded server's forking thread may end, its children moving to
    another thread while a reader goes through the lists, so a live child can be missed; proc(5) calls
    those lists reliable only while the children are stopped or frozen."""
    return [child for child in pids() if (s := stat(child)) is not None and s.ppid == pid]
