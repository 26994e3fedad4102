"""The readiness prober tells a server that answers "not ready" from one that does not answer at all."""

from __future__ import annotations

import http.server
import socket
import threading
import time

import pytest

from clients.availability import ReadinessProber


class _Readiness(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # the name http.server calls
        self.send_response(200 if self.path == "/v2/health/ready" else 400)
        self.end_headers()

    def log_message(self, *args):  # no access log on stderr
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Readiness)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ready_not_ready_and_no_answer_are_three_readings(server):
    prober = ReadinessProber(server, "rank", timeout_s=5)
    assert prober._ok(f"http://{server}/v2/health/ready") is True
    assert prober._ok(f"http://{server}/v2/models/rank/ready") is False  # answered 400
    assert prober._ok(f"http://127.0.0.1:{_closed_port()}/v2/health/ready") is None  # nobody listens


def test_probes_record_each_reading(server):
    with ReadinessProber(server, "rank", pause_s=0.001) as prober:
        deadline = time.monotonic() + 30
        while len(prober.probes) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert all(p.model_ready is False and p.server_ready is True for p in prober.probes)
    assert all(p.start <= p.end for p in prober.probes)
