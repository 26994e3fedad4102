"""Locust load test of `rank` through the RankingClient (gRPC, or HTTP for an http:// host); `mmrank
loadtest` runs it headless.

    locust -f clients/locustfile.py --headless --host 127.0.0.1:8001 \
        --requests-file OUT/requests.npz --user-steps 1,2,4,8 --step-seconds 20 --calls-file OUT/calls.csv

Each simulated user calls `rank` back to back (a closed loop, no think time), taking requests in turn
from the requests file (real test-split histories and candidate sets, clients/request_sample.py). Every
call is reported to locust's request event and a failed call is a failure: the client makes exactly one
attempt (no retry on UNAVAILABLE). `StepShape` holds each user count of --user-steps for --step-seconds
and then ends the run, so the test always stops by itself. Every call is also written to --calls-file
with the step it started in, from which `mmrank loadtest` computes exact per-step percentiles.
"""

from __future__ import annotations

import csv
import itertools
import sys
import time

# Before any channel exists: grpc's blocking calls must yield to gevent, or one user blocks them all.
import grpc.experimental.gevent as grpc_gevent
from locust import LoadTestShape, User, events, task

from clients.loadtest import check_loopback, parse_user_steps
from clients.ranking_client import ClientConfig, RankingClient
from clients.request_sample import RequestSample
from common.errors import MMRankError

grpc_gevent.init_gevent()

CALL_FIELDS = ("step", "users", "start_s", "latency_ms", "ok", "candidates", "error")
SPAWN_RATE = 100  # users per second: a step's users start within a fraction of a second
IDLE_S = 0.05  # between the end of the ramp and the shape's next tick (at most 1 s), users wait
_calls: list[tuple] = []
_requests: itertools.cycle | None = None


def user_steps(text: str) -> tuple[int, ...]:
    return parse_user_steps(text, "--user-steps")


@events.init_command_line_parser.add_listener
def _arguments(parser):
    parser.add_argument("--requests-file", default="", help="requests (.npz) from clients/request_sample.py")
    parser.add_argument("--user-steps", default="1,2,4,8", help="simulated users in each step of the ramp")
    parser.add_argument("--step-seconds", type=float, default=20.0, help="how long each step lasts")
    parser.add_argument("--calls-file", default="", help="CSV of every call (step, latency, outcome)")
    parser.add_argument("--call-timeout", type=float, default=5.0, help="seconds per call")
    parser.add_argument("--model", default="rank", help="the model to call")


@events.init.add_listener
def _setup(environment, **_kwargs):
    """Refuse a non-loopback --host and load the requests; locust logs and ignores a listener's
    exceptions, so a bad input exits here (SystemExit is not caught) with one line naming it."""
    global _requests
    try:
        check_loopback(environment.host or "", "--host")
        user_steps(environment.parsed_options.user_steps)
        sample = RequestSample.load(environment.parsed_options.requests_file)
    except MMRankError as e:
        sys.exit(f"locustfile: {e}")
    rows = zip(sample.users.tolist(), sample.histories, sample.candidates, strict=True)
    _requests = itertools.cycle(list(rows))


@events.test_stop.add_listener
def _write_calls(environment, **_kwargs):
    path = environment.parsed_options.calls_file
    if path:
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(CALL_FIELDS)
            writer.writerows(_calls)


class StepShape(LoadTestShape):
    """--user-steps users, each step held --step-seconds, then None: the run ends."""

    def step(self) -> int | None:
        """The step now, None once the ramp is over."""
        opts = self.runner.environment.parsed_options
        step = int(self.get_run_time() // opts.step_seconds)
        return step if step < len(user_steps(opts.user_steps)) else None

    def tick(self):
        step = self.step()
        return (
            None
            if step is None
            else (user_steps(self.runner.environment.parsed_options.user_steps)[step], SPAWN_RATE)
        )


class RankUser(User):
    """One caller with its own client (a gRPC channel, or HTTP connections), calling `rank` in a closed
    loop."""

    def on_start(self):
        opts = self.environment.parsed_options
        self.name = opts.model
        cfg = ClientConfig(url=self.host, model=opts.model, timeout_s=opts.call_timeout, retries=0)
        self.client, self.protocol = RankingClient(cfg), cfg.endpoint.protocol

    def on_stop(self):
        self.client.close()

    @task
    def rank(self):
        shape, runner = self.environment.shape_class, self.environment.runner
        step, users, start_s = shape.step(), runner.user_count, shape.get_run_time()
        if step is None:  # no call outside the ramp: every call made belongs to a step
            time.sleep(IDLE_S)
            return
        user, history, candidates = next(_requests)
        t0 = time.perf_counter()
        error = None
        try:
            self.client.rank(history, candidates, user)
        except Exception as e:  # every failure is reported, whatever raised it
            error = e
        latency_ms = (time.perf_counter() - t0) * 1e3
        events.request.fire(
            request_type=self.protocol,
            name=self.name,
            response_time=latency_ms,
            response_length=len(candidates),
            exception=error,
            context={"step": step, "users": users},
        )
        message = "" if error is None else f"{type(error).__name__}: {error}".replace("\n", " ")
        _calls.append(
            (
                step,
                users,
                round(start_s, 6),
                round(latency_ms, 4),
                int(error is None),
                len(candidates),
                message,
            )
        )
