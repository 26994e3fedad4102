"""Triton's own Prometheus counters (the metrics port), read before and after a measurement.

Triton counts, per model, successful requests, executions (batches) and cumulative microseconds spent
queued, in compute (input copy, inference, output copy) and in the whole request. The difference of two
scrapes divided by the requests in between says where one request's time went, per model, as the
server saw it (an ensemble's own queue and compute are its scheduling, not its members' work).
"""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass

from common.errors import MMRankError

COUNTERS = {
    "success": "nv_inference_request_success",
    "failure": "nv_inference_request_failure",
    "executions": "nv_inference_exec_count",
    "request_us": "nv_inference_request_duration_us",
    "queue_us": "nv_inference_queue_duration_us",
    "input_us": "nv_inference_compute_input_duration_us",
    "infer_us": "nv_inference_compute_infer_duration_us",
    "output_us": "nv_inference_compute_output_duration_us",
}
_LINE = re.compile(r'^(\w+)\{[^}]*model="([^"]+)"[^}]*\}\s+(\S+)$')

Scrape = dict[str, dict[str, float]]  # model -> counter key -> value (summed over versions)


def parse(text: str) -> Scrape:
    names = {metric: key for key, metric in COUNTERS.items()}
    out: Scrape = defaultdict(lambda: dict.fromkeys(COUNTERS, 0.0))
    for line in text.splitlines():
        match = _LINE.match(line)
        if match and match.group(1) in names:
            out[match.group(2)][names[match.group(1)]] += float(match.group(3))
    return dict(out)


SETTLE_S = 0.1  # pause between the scrapes of `settled_scrape`
SETTLE_TRIES = 50


def scrape(metrics_url: str, timeout_s: float = 5.0) -> Scrape:
    url = f"http://{metrics_url}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return parse(response.read().decode())
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        raise MMRankError(
            f"cannot read Triton metrics at {url} (is --metrics-url the metrics port?): {e}"
        ) from e


@dataclass(frozen=True)
class ModelTimes:
    """One model's share of a measurement, per successful request (microseconds)."""

    requests: int
    failures: int
    batch: float  # requests per execution (dynamic batching merges requests)
    queue_us: float
    compute_us: float  # input + inference + output
    infer_us: float
    request_us: float  # queue + compute + the server's own handling


def _per(total: float, n: float) -> float:
    return total / n if n > 0 else float("nan")


def per_request(before: Scrape, after: Scrape) -> dict[str, ModelTimes]:
    """Each model that served or failed a request between the two scrapes."""
    out = {}
    for model, now in sorted(after.items()):
        then = before.get(model, dict.fromkeys(COUNTERS, 0.0))
        d = {k: now[k] - then[k] for k in COUNTERS}
        n = d["success"]
        if n <= 0 and d["failure"] <= 0:
            continue
        out[model] = ModelTimes(
            requests=int(n),
            failures=int(d["failure"]),
            batch=_per(n, d["executions"]),
            queue_us=_per(d["queue_us"], n),
            compute_us=_per(d["input_us"] + d["infer_us"] + d["output_us"], n),
            infer_us=_per(d["infer_us"], n),
            request_us=_per(d["request_us"], n),
        )
    return out


def settled_scrape(metrics_url: str) -> Scrape:
    """A scrape equal to the one SETTLE_S before it. Triton may count a request a moment after its
    response reached the client (seen here: a step's delta of an ensemble member held 21 requests for
    20 calls, a warm-up call counted late), so a scrape taken at once can miss calls or count extra."""
    previous = scrape(metrics_url)
    for _ in range(SETTLE_TRIES):
        time.sleep(SETTLE_S)
        current = scrape(metrics_url)
        if current == previous:
            return current
        previous = current
    raise MMRankError(f"Triton metrics at {metrics_url} keep changing: is another client calling the server?")
