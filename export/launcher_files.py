"""The files a running launcher owns outside the repository, named so that a later launcher can remove
them when their owner was killed.

A launcher writes a work folder into the temp directory (the server's backend directory, a few MiB, and
its log) and the server's Python backend creates shared-memory regions in /dev/shm. stop() removes
both; a launcher killed by SIGKILL (or the OOM killer) cannot: its server gets SIGTERM and exits
(export/triton_launcher.py), but the folder and any region the server had not removed stay. So both
names carry the owner, `<pid>-<start>` (start: the process's start time in clock ticks after boot,
which a later process reusing the pid does not share), and every launcher, as it starts, removes the
folders and regions of owners that no longer run. Only names of that form are touched, and only
files of the same user; the temp directory and /dev/shm are assumed not to be shared with another
pid namespace (a container's are its own), where the owner would look dead.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from export import procfs

WORKDIR_PREFIX = "mmrank-triton-"
SHM_PREFIX = "mmrank_triton_"
SHM_DIR = Path("/dev/shm")
_WORKDIR = re.compile(rf"^{WORKDIR_PREFIX}(\d+)-(\d+)-\w+$")
_REGION = re.compile(rf"^{SHM_PREFIX}(\d+)-(\d+)_")


def owner_tag(pid: int | None = None) -> str:
    """`<pid>-<start>` of the process (this one by default)."""
    pid = os.getpid() if pid is None else pid
    found = procfs.stat(pid)
    if found is None:
        raise ProcessLookupError(pid)
    return f"{pid}-{found.start}"


def _orphaned(path: Path, pattern: re.Pattern) -> bool:
    """Whether `path` is named by a launcher of this user that no longer runs."""
    match = pattern.match(path.name)
    if match is None or procfs.running(int(match[1]), int(match[2])):
        return False
    try:
        return path.lstat().st_uid == os.getuid()
    except OSError:  # removed meanwhile
        return False


def sweep(temp_dir: Path | None = None, shm_dir: Path = SHM_DIR) -> list[Path]:
    """Remove the work folders and shared-memory regions whose owning launcher no longer runs; returns
    what was removed."""
    temp_dir = Path(temp_dir or tempfile.gettempdir())
    removed = []
    for folder in temp_dir.glob(f"{WORKDIR_PREFIX}*"):
        if _orphaned(folder, _WORKDIR):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    for region in shm_dir.glob(f"{SHM_PREFIX}*"):
        if _orphaned(region, _REGION):
            region.unlink(missing_ok=True)
            removed.append(region)
    return removed


def make_workdir() -> Path:
    """A new work folder of this process in the temp directory, after sweeping those of dead launchers."""
    sweep()
    return Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{owner_tag()}-"))


def shm_prefix(instance: object) -> str:
    """The shared-memory region prefix of one server of this process (`instance` tells servers apart)."""
    return f"{SHM_PREFIX}{owner_tag()}_{id(instance):x}_"
