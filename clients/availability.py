"""How available a served model is while something happens to the server: callers calling it back to
back and a prober reading its readiness, every answer timed.

`Callers(url, model, request, output)` calls `model` over gRPC from several threads, each with its own
client, until stopped; `ReadinessProber(http_url, model)` reads `/v2/models/<model>/ready` and
`/v2/health/ready` over HTTP back to back, as a load balancer or a readiness probe would. Both are
context managers and keep every call and probe with its start and end (time.monotonic()). The
recovery test and benchmark (a backend process killed under load) use them; they work against any
Triton server.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Call:
    start: float  # time.monotonic()
    end: float
    output: np.ndarray | None  # None: the call failed
    error: str = ""
    status: str = ""  # of a failed call: the gRPC status, e.g. StatusCode.UNAVAILABLE

    @property
    def ms(self) -> float:
        return (self.end - self.start) * 1e3


class Callers:
    """`count` threads calling `model` with `request()` (a list of tritonclient InferInputs) back to
    back; a failed call is retried after `pause_s`, as a client would, rather than at once."""

    def __init__(
        self,
        url: str,
        model: str,
        request: Callable[[], list],
        output: str,
        count: int = 4,
        pause_s: float = 0.02,
        timeout_s: float = 60.0,
    ):
        self.url, self.model, self.request, self.output = url, model, request, output
        self.pause_s, self.timeout_s = pause_s, timeout_s
        self.calls: list[Call] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(count)]

    def _run(self) -> None:
        import tritonclient.grpc as grpc

        with grpc.InferenceServerClient(self.url) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    result = client.infer(self.model, self.request(), client_timeout=self.timeout_s)
                    self.calls.append(Call(start, time.monotonic(), result.as_numpy(self.output)))
                except grpc.InferenceServerException as e:
                    self.calls.append(Call(start, time.monotonic(), None, e.message(), str(e.status())))
                    time.sleep(self.pause_s)

    def good_after(self, t: float) -> int:
        """Successful calls started after `t`."""
        return sum(c.output is not None and c.start > t for c in list(self.calls))

    def __enter__(self) -> Callers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout_s + 30)


@dataclass(frozen=True)
class Probe:
    """One reading of both readiness endpoints: True (200), False (answered, not ready) or None (no
    answer: the connection failed or timed out, which says nothing of the model's state)."""

    start: float  # time.monotonic()
    end: float
    model_ready: bool | None  # /v2/models/<model>/ready
    server_ready: bool | None  # /v2/health/ready


class ReadinessProber:
    """Reads the model's and the server's readiness back to back, `pause_s` apart."""

    def __init__(self, http_url: str, model: str, pause_s: float = 0.01, timeout_s: float = 10.0):
        self.urls = (f"http://{http_url}/v2/models/{model}/ready", f"http://{http_url}/v2/health/ready")
        self.pause_s, self.timeout_s = pause_s, timeout_s
        self.probes: list[Probe] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _ok(self, url: str) -> bool | None:
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as response:
                return response.status == 200
        except urllib.error.HTTPError:  # an answer: 400, not ready
            return False
        except (urllib.error.URLError, OSError):  # no answer at all
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            model, server = (self._ok(url) for url in self.urls)
            self.probes.append(Probe(start, time.monotonic(), model, server))
            time.sleep(self.pause_s)

    def __enter__(self) -> ReadinessProber:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self.timeout_s + 5)
