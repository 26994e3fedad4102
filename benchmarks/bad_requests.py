"""Bad `rank` requests against the real tritonserver, python and native backends, over gRPC and HTTP:
each one's answer, time, and the server's memory under a stream of oversize ones.

    python benchmarks/bad_requests.py [--rounds 50] [--protocols grpc,http]
        [--out benchmarks/results/bad_requests.md]

The repositories are the ones of benchmarks/serving_overhead.py (em3, L=50, `mmrank repo` defaults: at
most 2,000 candidates and 1,000 history ids per user, 4 MiB of inputs), rendered with --backend python
and --backend onnxruntime, each served on its own. The python backend refuses a request past a limit
(INVALID_ARGUMENT naming it, model_repository/limits.py); the native lookup graph cannot refuse: it
answers within the limits (export/lookup_graph.py: no candidates -> empty scores, candidates past the
limit -inf and unknown, only the most recent max_history history ids read; the native `rank` is no
batching ensemble, so its graph ranks the first max_batch_size users and answers the rest -inf). Memory
is the resident set of the server's whole process group (tritonserver and its backend stubs), read from
/proc, before and after each of `--rounds` oversize requests of each kind in STREAMS: it must stay flat.
Each protocol sends the same raw tensors through tritonclient (gRPC, or HTTP with binary tensors), not
the project's client, which refuses most of these before sending.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.serving_overhead import BACKENDS, export_em3  # noqa: E402
from common.provenance import record  # noqa: E402
from export.repository import RenderConfig, render_repository  # noqa: E402
from export.triton_launcher import TritonConfig, TritonServer  # noqa: E402

OK_HIST, OK_CANDS = np.arange(1, 51, dtype=np.int64)[None], np.arange(1, 101, dtype=np.int64)[None]
CASES = {
    "0 candidates": {"candidate_ids": np.zeros((1, 0), np.int64)},
    "2,001 candidates": {"candidate_ids": np.ones((1, 2001), np.int64)},
    "300,000 candidates": {"candidate_ids": np.ones((1, 300_000), np.int64)},
    "1,001 history ids": {"history_ids": np.ones((1, 1001), np.int64)},
    "13,000,000 history ids (104 MB)": {"history_ids": np.ones((1, 13_000_000), np.int64)},
    "history_ids as FP32": {"history_ids": np.ones((1, 50), np.float32)},
    "user_feats 5 wide (model has 2)": {"user_feats": np.zeros((1, 5), np.int64)},
    "history_ids [50] without the batch axis": {"history_ids": np.ones(50, np.int64)},
    "user_id 10**12 (unknown user)": {"user_id": np.array([[10**12]], np.int64)},
    "65 users (max_batch_size is 64)": {
        "history_ids": np.repeat(OK_HIST, 65, axis=0),
        "candidate_ids": np.repeat(OK_CANDS, 65, axis=0),
    },
}
STREAMS = ("300,000 candidates", "13,000,000 history ids (104 MB)")
DTYPES = {np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32"}


def group_rss_mib(pgid: int) -> float:
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                total += int((stat.parent / "statm").read_text().split()[1])
        except (OSError, ValueError):
            continue
    return total * 4096 / 2**20


def _summary(result) -> str:
    """An answer in a few words: how many scores, how many known, how many finite (over every user)."""
    scores, known = result.as_numpy("scores"), result.as_numpy("candidate_known")
    user, version = result.as_numpy("user_known"), result.as_numpy("item_table_version")
    users = f"{scores.shape[0]} users x " if scores.shape[0] != 1 else ""
    return (
        f"OK: {users}{scores.shape[-1]} scores, {int(known.sum())} known, "
        f"{int(np.isfinite(scores).sum())} finite; "
        f"user_known {bool(user.all())}, item_table_version {int(version.reshape(-1)[0])}"
    )


PROTOCOLS = ("grpc", "http")
TIMEOUT_S = 120


class Caller:
    """`rank` with raw tensors through tritonclient over one protocol."""

    def __init__(self, server: TritonServer, protocol: str):
        if protocol == "grpc":
            import tritonclient.grpc as module

            self.client = module.InferenceServerClient(server.grpc_url)
            self.options = {"client_timeout": TIMEOUT_S}
        else:
            import tritonclient.http as module

            self.client = module.InferenceServerClient(
                server.http_url, connection_timeout=TIMEOUT_S, network_timeout=TIMEOUT_S
            )
            self.options = {}
        self.module = module

    def __call__(self, tensors: dict[str, np.ndarray]) -> tuple[str, float]:
        inputs = []
        for name, arr in tensors.items():
            t = self.module.InferInput(name, list(arr.shape), DTYPES[arr.dtype])
            t.set_data_from_numpy(arr)
            inputs.append(t)
        start = time.perf_counter()
        try:
            answer = _summary(self.client.infer("rank", inputs, **self.options))
        except self.module.InferenceServerException as e:
            answer = f"{e.status()}: {e.message()}"
        return answer, (time.perf_counter() - start) * 1e3


def _stream_row(name: str, trace: list[float]) -> str:
    """A stream's memory: where it started, settled and ended, and whether it still grows in its second
    half (a leak grows by about the message size per request; an allocator cache levels off)."""
    half = trace[len(trace) // 2 :]
    slope = np.polyfit(np.arange(len(half)), half, 1)[0]
    quarter = trace[max(1, len(trace) // 4)]
    return (
        f"| {name} | {trace[0]:.0f} | {quarter:.0f} | {trace[-1]:.0f} | {max(trace):.0f} "
        f"| {half[0]:.0f} -> {half[-1]:.0f} ({slope:+.1f} MiB) |"
    )


def run_backend(repo: Path, rounds: int, protocols: list[str]) -> dict:
    """{protocol: every CASES answer, the STREAMS memory traces and a good request afterwards}, the
    protocols one after the other on one server."""
    base = {"history_ids": OK_HIST, "candidate_ids": OK_CANDS}
    out = {}
    with TritonServer(TritonConfig(repo, control_mode="explicit")) as server:
        for protocol in protocols:
            call = Caller(server, protocol)
            call(base)
            rows = [(name, *call({**base, **change})) for name, change in CASES.items()]
            streams = []
            for name in STREAMS:
                trace = [group_rss_mib(server.process.pid)]
                for _ in range(rounds):
                    call({**base, **CASES[name]})
                    trace.append(group_rss_mib(server.process.pid))
                streams.append((name, trace))
            out[protocol] = {"rows": rows, "streams": streams, "after": call(base)[0]}
    return out


def _protocols(text: str) -> list[str]:
    chosen = [p.strip() for p in text.split(",") if p.strip()]
    if not chosen or any(p not in PROTOCOLS for p in chosen):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a comma-separated list of {', '.join(PROTOCOLS)}"
        )
    return chosen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out", default="benchmarks/results/bad_requests.md", help="the report (markdown)")
    p.add_argument(
        "--rounds", type=int, default=50, help="oversize requests of each kind for the memory check"
    )
    p.add_argument(
        "--protocols", type=_protocols, default="grpc,http", help="comma-separated, each on the same servers"
    )
    args = p.parse_args(argv)
    provenance = record(
        ["python", "benchmarks/bad_requests.py", *(argv if argv is not None else sys.argv[1:])]
    )
    results = {}
    with tempfile.TemporaryDirectory(prefix="mmrank-bad-") as tmp:
        export = export_em3(Path(tmp), 50)
        for name, backend in BACKENDS.items():
            repo = Path(tmp) / name
            render_repository(export, repo, RenderConfig(backend=backend))
            for protocol, r in run_backend(repo, args.rounds, args.protocols).items():
                results[name, protocol] = r
    lines = [
        "# Bad `rank` requests, python and native backends: answers and server memory",
        "",
        f"Command: `{provenance['command']}`  ",
        f"Commit: {provenance['commit']}  ",
        f"Machine: {provenance['machine']}  ",
        f"Date: {provenance['date']}; 1-minute load average before / after: "
        f"{provenance['load_average_1min']:.2f} / {os.getloadavg()[0]:.2f}",
        "",
        "`mmrank repo` defaults (at most 2,000 candidates and 1,000 history ids per user). python: the "
        "lookup refuses a request past a limit. native: the lookup graph answers within the limits.",
        "",
        "| request | backend | protocol | answer | ms |",
        "|---|---|---|---|---:|",
    ]
    for case in CASES:
        for (name, protocol), r in results.items():
            answer, ms = next((a, m) for c, a, m in r["rows"] if c == case)
            lines.append(f"| {case} | {name} | {protocol} | {answer} | {ms:.1f} |")
    lines += [
        "",
        f"Resident memory of the server's process group (tritonserver + backend stubs) around a stream of "
        f"{args.rounds} requests of one kind, in this order:",
        "",
        "| stream | backend | protocol | MiB before | after 1/4 of the stream | after all | max | last half: "
        "first -> last (least-squares slope / request) |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for (name, protocol), r in results.items():
        lines += [
            _stream_row(s, trace).replace(f"| {s} |", f"| {s} | {name} | {protocol} |", 1)
            for s, trace in r["streams"]
        ]
    lines += ["", "Every reading, one per request:", ""]
    for (name, protocol), r in results.items():
        lines += [
            f"- {name} over {protocol}, {s}: {' '.join(f'{m:.0f}' for m in t)}" for s, t in r["streams"]
        ]
    lines += [
        "",
        *[f"A good request afterwards, {n} over {p}: {r['after']}." for (n, p), r in results.items()],
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print(Path(args.out).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
