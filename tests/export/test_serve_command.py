"""`mmrank serve` as a user runs it: a foreground process that serves until SIGTERM, on loopback."""

import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from clients.ranking_client import ClientConfig, RankingClient
from export.repository import RenderConfig, render_repository
from export.triton_launcher import free_port
from mmrank.cli import main


@pytest.fixture(scope="module")
def repo(small_export, triton_server, tmp_path_factory):
    # triton_server: fails where the installed server cannot start, and has prepared its environment.
    out = tmp_path_factory.mktemp("serve") / "repo"
    render_repository(small_export.out, out, RenderConfig(backend="python", max_batch_size=4))
    return out


def test_serve_answers_ranking_calls_and_stops_on_sigterm(repo):
    grpc_port = free_port()
    ports = [
        "--grpc-port",
        str(grpc_port),
        "--http-port",
        str(free_port()),
        "--metrics-port",
        str(free_port()),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmrank.cli", "serve", "--repo", str(repo), *ports],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert "tritonserver ready" in line and f"127.0.0.1:{grpc_port}" in line
        with RankingClient(ClientConfig(url=f"127.0.0.1:{grpc_port}", timeout_s=30)) as client:
            scores = client.rank([1, 2, 3], [4, 5])
        assert scores.shape == (2,) and np.isfinite(scores).all()
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


def test_serve_names_a_missing_repository(tmp_path, capsys):
    ports = [
        "--grpc-port",
        str(free_port()),
        "--http-port",
        str(free_port()),
        "--metrics-port",
        str(free_port()),
    ]
    assert main(["serve", "--repo", str(tmp_path / "nope"), *ports]) == 1
    assert "model repository not found" in capsys.readouterr().err
