"""`mmrank serve` as a user runs it: a foreground process that serves until SIGTERM, on loopback."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from server_processes import group, regions, wait_gone

from clients.ranking_client import ClientConfig, RankingClient
from common.cpu_latency import PM_QOS_DEVICE, current_limit_us
from export import procfs
from export.backend_supervisor import backend_processes
from export.parity import composed_scores
from export.repository import RenderConfig, render_repository
from export.triton_launcher import NO_CUDA_NOTE, cuda_driver, free_port, parse_cpus
from mmrank.cli import main
from model_repository.item_table import ItemTable


@pytest.fixture(scope="module")
def repo(small_export, triton_server, tmp_path_factory):
    # triton_server: fails where the installed server cannot start, and has prepared its environment.
    out = tmp_path_factory.mktemp("serve") / "repo"
    render_repository(small_export.out, out, RenderConfig(backend="python", max_batch_size=4))
    return out


def test_serve_answers_ranking_calls_and_stops_on_sigterm(repo):
    """On the one CPU --cpus names: the server and its backend stubs, all of them; with the CPU wake-up
    latency held at 0 us while it serves, where this process may hold it."""
    hold = PM_QOS_DEVICE.exists() and os.access(PM_QOS_DEVICE, os.W_OK)
    grpc_port = free_port()
    cpu = max(os.sched_getaffinity(0))
    ports = [
        "--grpc-port",
        str(grpc_port),
        "--http-port",
        str(free_port()),
        "--metrics-port",
        str(free_port()),
        *(["--cpu-latency-us", "0"] if hold else []),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmrank.cli", "serve", "--repo", str(repo), *ports, "--cpus", str(cpu)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert "tritonserver ready" in line and f"127.0.0.1:{grpc_port}" in line
        if not cuda_driver():  # the launcher says why the log's CUDA errors are harmless
            assert proc.stdout.readline().strip() == f"tritonserver: {NO_CUDA_NOTE}"
        if hold:
            said = f"tritonserver: CPU wake-up latency held at 0 us ({PM_QOS_DEVICE}) while it runs"
            assert proc.stdout.readline().strip() == said
            assert current_limit_us() == 0
        with RankingClient(ClientConfig(url=f"127.0.0.1:{grpc_port}", timeout_s=30)) as client:
            scores, known, _, _ = client.rank([1, 2, 3], [4, 5])
        assert scores.shape == (2,) and np.isfinite(scores).all() and known.all()
        (server,) = procfs.children(proc.pid)
        processes = group(server)
        assert len(processes) > 1 and all(os.sched_getaffinity(pid) == {cpu} for pid in processes)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_refuses_a_port_in_use(repo, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        others = ["--http-port", str(free_port()), "--metrics-port", str(free_port())]
        assert main(["serve", "--repo", str(repo), "--grpc-port", str(port), *others]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mmrank serve: error: --grpc-port {port}: 127.0.0.1:{port} is already in use"]


def _free_ports() -> list[str]:
    return [
        "--grpc-port",
        str(free_port()),
        "--http-port",
        str(free_port()),
        "--metrics-port",
        str(free_port()),
    ]


@pytest.mark.parametrize(
    ("cpus", "says"),
    [("x", "expected CPU numbers"), ("3-1", "'3-1' is not a CPU range"), ("100000", "CPU 100000 is not one")],
)
def test_serve_names_bad_cpus(repo, cpus, says, capsys):
    assert main(["serve", "--repo", str(repo), *_free_ports(), "--cpus", cpus]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mmrank serve: error: --cpus {cpus!r}: ") and says in err, err


def test_serve_names_a_bad_cpu_latency(repo, capsys):
    assert main(["serve", "--repo", str(repo), *_free_ports(), "--cpu-latency-us", "-5"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "mmrank serve: error: CPU wake-up latency -5 us: expected 0 to 2147483647", err


def test_parse_cpus_reads_lists_and_ranges():
    allowed = sorted(os.sched_getaffinity(0))
    first, last = allowed[0], allowed[-1]
    assert parse_cpus(str(first)) == {first}
    assert parse_cpus(f" {first}-{first}") == {first}
    assert parse_cpus(f"{last},{first}") == {first, last}


def test_serve_names_a_missing_repository(tmp_path, capsys):
    assert main(["serve", "--repo", str(tmp_path / "nope"), *_free_ports()]) == 1
    assert "model repository not found" in capsys.readouterr().err


def _as_background_job() -> None:
    """A script's `mmrank serve &` starts with SIGINT ignored (the shell's doing); a stop by SIGINT must
    work all the same, so every launcher here starts that way, whatever started pytest."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _serve(repo, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "mmrank.cli", "serve", "--repo", str(repo), *_free_ports(), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_as_background_job,
    )


def _server_of(proc, stubs: int) -> int:
    """The tritonserver pid under `mmrank serve`, once it has started `stubs` backend stubs."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for pid in procfs.children(proc.pid):
            if len(group(pid)) > stubs:
                return pid
        time.sleep(0.05)
    raise AssertionError("tritonserver did not start its backend stubs")


def _regions(launcher_pid: int) -> list[str]:
    return regions(f"mmrank_triton_{launcher_pid}-")


def _workdir(ready_line: str) -> Path:
    """The launcher's work folder in the temp directory: where the ready line says the log is."""
    return Path(ready_line.split("; log ")[1].rsplit(" (", 1)[0]).parent


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_while_models_load_leaves_no_process_or_shared_memory(repo, sig):
    proc = _serve(repo)
    server = _server_of(proc, stubs=1)  # stopped while its models are still loading
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    assert "Traceback" not in out and wait_gone(server) == [] and _regions(proc.pid) == []


def test_sigkill_of_mmrank_serve_takes_the_server_down_and_the_next_start_sweeps_its_files(repo):
    killed = _serve(repo)
    try:
        ready = killed.stdout.readline()
        assert "tritonserver ready" in ready
        server, workdir = procfs.children(killed.pid)[0], _workdir(ready)
        assert len(group(server)) > 1  # the server and its stubs
        assert workdir.name.startswith("mmrank-triton-")
    finally:
        killed.kill()
        killed.wait()
    assert wait_gone(server) == [] and workdir.is_dir()  # a SIGKILLed launcher cannot remove it
    proc = _serve(repo)
    try:
        ready = proc.stdout.readline()
        assert "tritonserver ready" in ready
        assert not workdir.exists() and _regions(killed.pid) == []
        own = _workdir(ready)
        assert own.is_dir() and _regions(proc.pid) != []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not own.exists() and _regions(proc.pid) == []


def test_a_bad_newest_table_version_serves_the_newest_valid_one(small_export, repo, tmp_path):
    bad = tmp_path / "repo"
    shutil.copytree(repo, bad)
    table = ItemTable.read(bad / "item_lookup" / "1" / "item_table")
    wrong = ItemTable(table.ids, np.zeros((len(table.ids), table.d + 1), np.float32), table.item_rows)
    shutil.copytree(bad / "item_lookup" / "1", bad / "item_lookup" / "2")  # model.py and the runtime
    shutil.rmtree(bad / "item_lookup" / "2" / "item_table")
    wrong.write(bad / "item_lookup" / "2" / "item_table")
    proc = _serve(bad)
    try:
        said = proc.stdout.readline()
        assert (
            "item table version 2 skipped: content width d is 17" in said
            and "serving item table version 1" in said
        )
        ready = proc.stdout.readline()
        assert "tritonserver ready" in ready
        url = ready.split("grpc ")[1].split(",")[0]
        with RankingClient(ClientConfig(url=url, timeout_s=30)) as client:
            scores, known, version, _ = client.rank([1, 2, 3], [4, 5])
        want = composed_scores(small_export.out, np.array([[1, 2, 3]]), np.array([[4, 5]]))[0]
        assert known.all() and version == 1  # the response says which table answered
        np.testing.assert_allclose(scores, want, atol=1e-5)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_in_poll_mode_a_dead_backend_process_stops_the_server_saying_why(repo):
    proc = _serve(repo, "--control-mode", "poll")
    try:
        ready = proc.stdout.readline()
        assert "tritonserver ready" in ready
        server, workdir = procfs.children(proc.pid)[0], _workdir(ready)
        lookup = next(p for p in backend_processes(server, "mmrank_triton_") if p.model == "item_lookup")
        os.kill(lookup.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, out
    said = f"the backend process of item_lookup_0_0 (pid {lookup.pid}) died; in model control mode 'poll'"
    assert f"mmrank serve: error: {said}" in out
    assert wait_gone(server) == [] and not workdir.exists() and _regions(proc.pid) == []
