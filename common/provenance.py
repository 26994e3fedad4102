"""Where a number comes from: the commit of the code that produced it and the machine that ran it.

Every run's metrics.json, every ablation table and every benchmark report carry these, so a result
can be traced to its code and hardware without its author writing either down by hand.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

# torch is imported where it is used, so torch-free tools (the data generator's memory benchmark) can
# name the CPU without loading it.

CODE_ROOT = Path(__file__).resolve().parent.parent
# Neither results an earlier benchmark run wrote into the checkout nor prose (README,
# results notes) change the code measured.
NOT_CODE = (":!benchmarks/results", ":!*.md")
UNKNOWN = "unknown"
# A copied tree whose git metadata is missing or stale (e.g. a working tree copied to a GPU host) is told
# its commit by whoever sent it; the record says it was declared, not read.
COMMIT_ENV = "MMRANK_COMMIT"


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=False, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_commit(root: Path = CODE_ROOT) -> str:
    """Short hash of the checkout at `root` (this code's by default), marked when tracked code differs.

    'unknown' when `root` is not the top of a git checkout (an installed wheel, a copied tree), even
    inside another repository: a .venv in a checkout must not report that checkout's commit. Where
    $MMRANK_COMMIT is set, its value wins, marked as declared.
    """
    declared = os.environ.get(COMMIT_ENV, "").strip()
    if declared:
        return f"{declared} (declared by ${COMMIT_ENV})"
    top_and_head = (_git(root, "rev-parse", "--show-toplevel", "--short", "HEAD") or "").splitlines()
    if len(top_and_head) != 2 or Path(top_and_head[0]).resolve() != Path(root).resolve():
        return UNKNOWN
    head = top_and_head[1]
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ".", *NOT_CODE)
    return head + (" (uncommitted changes)" if dirty else "")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"


def machine() -> str:
    import torch

    return (
        f"{os.cpu_count()} CPUs ({cpu_name()}), GPU: {gpu_name()}, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


def record(command: list[str] | None = None) -> dict:
    """The provenance block of a result: command (this process's by default), commit, machine, when,
    how many torch threads and how busy the CPU was as it started."""
    import torch

    return {
        "command": shlex.join(command if command is not None else [Path(sys.argv[0]).name, *sys.argv[1:]]),
        "commit": code_commit(),
        "machine": machine(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_1min": os.getloadavg()[0],
    }
