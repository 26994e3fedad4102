"""Bad `rank` requests against the real tritonserver: each one's answer, time, and the server's memory.

    python benchmarks/bad_requests.py [--out benchmarks/results/bad_requests.md]

The repository is the one of benchmarks/serving_overhead.py (em3, L=50, `mmrank repo` defaults: at most
2,000 candidates and 1,000 history ids per user, 4 MiB of inputs). Memory is the resident set of the
server's whole process group (tritonserver and its backend stubs), read from /proc, before and after a
stream of `--rounds` refused requests of each kind in STREAMS: under such a stream it must stay flat.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.export_latency import machine  # noqa: E402
from benchmarks.serving_overhead import build  # noqa: E402
from common.provenance import code_commit  # noqa: E402
from export.repository import RenderConfig  # noqa: E402
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


def call(client, grpc, tensors: dict[str, np.ndarray]) -> tuple[str, float]:
    inputs = []
    for name, arr in tensors.items():
        t = grpc.InferInput(name, list(arr.shape), DTYPES[arr.dtype])
        t.set_data_from_numpy(arr)
        inputs.append(t)
    start = time.perf_counter()
    try:
        client.infer("rank", inputs, client_timeout=60)
        answer = "OK"
    except grpc.InferenceServerException as e:
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


def main(argv: list[str] | None = None) -> int:
    import tritonclient.grpc as grpc

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/bad_requests.md")
    p.add_argument("--rounds", type=int, default=20, help="rounds of every bad request for the memory check")
    args = p.parse_args(argv)
    rows, streams = [], []
    with tempfile.TemporaryDirectory(prefix="mmrank-bad-") as tmp:
        build(Path(tmp), 50, RenderConfig(backend="python"))
        with TritonServer(TritonConfig(Path(tmp) / "repo", control_mode="explicit")) as server:
            client = grpc.InferenceServerClient(server.grpc_url)
            base = {"history_ids": OK_HIST, "candidate_ids": OK_CANDS}
            call(client, grpc, base)
            for name, change in CASES.items():
                rows.append((name, *call(client, grpc, {**base, **change})))
            for name in STREAMS:
                trace = [group_rss_mib(server.process.pid)]
                for _ in range(args.rounds):
                    call(client, grpc, {**base, **CASES[name]})
                    trace.append(group_rss_mib(server.process.pid))
                streams.append((name, trace))
            ok, _ = call(client, grpc, base)
    lines = [
        "# Bad `rank` requests: answers and server memory",
        "",
        f"Command: `python benchmarks/bad_requests.py --rounds {args.rounds}`  ",
        f"Commit: {code_commit()}  ",
        f"Machine: {machine()}",
        "",
        "| request | answer | ms |",
        "|---|---|---:|",
        *[f"| {name} | {answer} | {ms:.1f} |" for name, answer, ms in rows],
        "",
        f"Resident memory of the server's process group (tritonserver + backend stubs) around a stream of "
        f"{args.rounds} refused requests of one kind, in this order:",
        "",
        "| stream | MiB before | after 1/4 of the stream | after all | max | last half: first -> last (least-squares slope / request) |",
        "|---|---:|---:|---:|---:|---|",
        *[_stream_row(name, trace) for name, trace in streams],
        "",
        "Every reading, one per request:",
        "",
        *[f"- {name}: {' '.join(f'{m:.0f}' for m in trace)}" for name, trace in streams],
        "",
        f"A good request afterwards: {ok}.",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print(Path(args.out).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
