"""A launcher's work folders and shared-memory regions: named by their owner, swept once it is gone."""

import os
import subprocess
import sys
import threading

from export import procfs
from export.launcher_files import owner_tag, sweep


def _gone_owner() -> str:
    """The owner tag of a process that has exited (and been waited for)."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    tag = owner_tag(child.pid)
    child.communicate(b"")
    return tag


def test_procfs_reads_this_process_and_its_children():
    me = procfs.stat(os.getpid())
    assert me is not None and me.state not in procfs.DEAD_STATES
    assert procfs.running(os.getpid(), me.start) and not procfs.running(os.getpid(), me.start + 1)
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; print(flush=True); sys.stdin.read()", "marker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        child.stdout.readline()  # it runs its own command line now
        assert child.pid in procfs.children(os.getpid())
        assert procfs.stat(child.pid).ppid == os.getpid()
        assert procfs.cmdline(child.pid)[-1] == "marker"
        start = procfs.stat(child.pid).start
        assert procfs.running(child.pid, start)
    finally:
        child.communicate(b"")
    assert not procfs.running(child.pid, start) and procfs.cmdline(child.pid) == []


def test_a_child_whose_forking_thread_ended_is_still_found():
    """A multi-threaded server forks from any thread, and that thread may end while the child runs on
    (its loading threads do): the child is still the process's, by its parent pid."""
    found = {}

    def fork() -> None:
        found["child"] = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
        )

    thread = threading.Thread(target=fork)
    thread.start()
    thread.join()
    child = found["child"]
    try:
        assert child.pid in procfs.children(os.getpid())
    finally:
        child.communicate(b"")


def test_sweep_removes_what_dead_launchers_left_and_nothing_else(tmp_path):
    temp, shm = tmp_path / "tmp", tmp_path / "shm"
    temp.mkdir()
    shm.mkdir()
    gone, alive = _gone_owner(), owner_tag()
    stale = [temp / f"mmrank-triton-{gone}-k2j_x9q1", shm / f"mmrank_triton_{gone}_7f01_region"]
    kept = [
        temp / f"mmrank-triton-{alive}-a1b2c3d4",  # a running launcher's
        temp / "mmrank-triton-f3mos79u",  # no owner in the name: never touched
        temp / "mmrank-other-thing",
        shm / f"mmrank_triton_{alive}_7f01_region",
        shm / "mmrank_triton_9952_7fd5dfd1ecd0_region",  # no owner tag
        shm / "sem.mp-dq73q5dh",
    ]
    for path in stale + kept:
        if path.parent == temp:
            path.mkdir()
            (path / "tritonserver.log").write_text("log")
        else:
            path.write_bytes(b"\0" * 64)
    assert sorted(sweep(temp, shm)) == sorted(stale)
    assert all(path.exists() for path in kept) and not any(path.exists() for path in stale)
    assert sweep(temp, shm) == []
