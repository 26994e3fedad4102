"""GPU serving benchmark of the torch backend: server start, parity, closed-loop latency, short locust run.

    python benchmarks/gpu_serving.py --out benchmarks/results [--shapes 100x50,500x50,100x1000,500x1000]

Part of `make gpu-check` (benchmarks/gpu_check.sh). For each history length L: the `em3` preset's model
with content width d (default 128) and history length L, random weights on the ML-100K-sized schema of
benchmarks/export_latency.py (latency depends on shapes, not on weights), exported (ranking graph,
item table, torch programs), rendered with `--backend torch` (fp16 program, table on the GPU, one CUDA
graph per bucket) and served by the real tritonserver on loopback. Then for each N at that L:

1. parity: every request's served scores against the same lookup + fp32 ranking graph in-process
   (onnxruntime on the CPU): max |difference| over known candidates and top-10 agreement;
2. closed loop (benchmarks/serving_latency.py `closed_loop`): c callers back to back (over up to
   --client-processes processes), exact p50/p95/p99, requests/s and candidates/s, the client's CPU
   cores, Triton's per-model queue and compute time;
3. the same ranking step in this process (`ranker_in_process`): the time left without gRPC and Triton;
4. locust (clients/loadtest.py) for a few seconds per user step, where locust is installed.

Requests are drawn uniformly from the catalogue (clients/request_sample.py `random_requests`): no
dataset here has L = 1,000 histories. Writes torch_serving_latency_gpu.{md,json,png} into --out, or
torch_serving_latency_cpu.* where the program runs on the CPU (no CUDA, or `--device cpu`): the same
path on this project's CPU machines, a check of the script and a CPU number, never a GPU one.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.export_latency import NUM_ITEMS, NUM_USERS, build_model  # noqa: E402
from benchmarks.serving_latency import (  # noqa: E402
    LEVEL_HEAD,
    LEVEL_RULE,
    LOOKUP,
    BenchConfig,
    Caller,
    closed_loop,
    level_cells,
    lookup_in_process,
    loop,
    rank_feeds,
    served_lookup,
)
from clients.loadtest import LoadTestConfig, percentiles, run_loadtest, table  # noqa: E402
from clients.request_sample import RequestSample, SampleConfig, random_requests  # noqa: E402
from common.provenance import record  # noqa: E402
from export.manifest import Manifest  # noqa: E402
from export.onnx_graphs import ExportConfig, export_model  # noqa: E402
from export.repository import RenderConfig, render_repository  # noqa: E402
from export.triton_launcher import TritonConfig, TritonServer  # noqa: E402
from model_repository.ort_graph import OrtGraph  # noqa: E402
from model_repository.torch_ranker import TorchRanker  # noqa: E402


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """ "100x50,500x1000" -> [(N, L), ...]."""
    return [tuple(int(v) for v in part.split("x")) for part in text.split(",") if part.strip()]


def buckets_for(ns: list[int], batches=(1, 4, 16)) -> str:
    """One bucket per batch size and per N rounded up to a power of two."""
    sizes = sorted({1 << (n - 1).bit_length() for n in ns})
    return ",".join(f"{b}x{n}" for n in sizes for b in batches)


def parity(url: str, export: Path, repo: Path, sample: RequestSample) -> dict:
    """Served scores vs the serving lookup + the fp32 ONNX ranking graph in-process, request by request."""
    lookup = lookup_in_process(repo)
    graph = OrtGraph(export / Manifest.read(export).graph("ranking").file)
    caller = Caller(url, 30.0)
    worst, agree = 0.0, []
    try:
        for i in range(len(sample)):
            served = caller.infer("rank", rank_feeds(sample, i), ["scores"])["scores"][0]
            want = graph.run(lookup(i, sample))["scores"][0]
            worst = max(worst, float(np.abs(served - want).max()))
            top = min(10, len(want))
            agree.append(len(set(np.argsort(-served)[:top]) & set(np.argsort(-want)[:top])) / top)
    finally:
        caller.close()
    return {"requests": len(sample), "max_abs_diff": worst, "top10_agreement": float(np.mean(agree))}


def build(args, length: int, ns: list[int], export: Path, repo: Path) -> dict[str, str]:
    """The random-weight model at history length `length`, exported and rendered for the torch backend;
    returns item_lookup's parameters (program, inputs, buckets, device, lookup)."""
    model = build_model(args.preset, history_len=length, d=args.d)
    config = ExportConfig(ranking_only=True, progress=False)
    export_model(model, export, {"path": "random-init", "sha256": "0" * 64}, None, config)
    rc = RenderConfig(backend="torch", precision=args.precision, device=args.device, buckets=buckets_for(ns))
    models = render_repository(export, repo, rc)
    return {k: v.string_value for k, v in models[LOOKUP].parameters.items()}


def ranker_in_process(repo: Path, params: dict[str, str]) -> TorchRanker:
    """The served ranking step (table lookup + program, CUDA graphs per bucket) as item_lookup builds it
    from its parameters, here in the benchmark's process: the time left when gRPC and Triton are gone."""
    folder, table, lookup = served_lookup(repo)
    return TorchRanker.from_params(folder, params, table, lookup)


def in_process(ranker: TorchRanker, sample: RequestSample, calls: int, warmup: int = 20) -> dict:
    """Percentiles of ranker.score per request (scores back on the host, so the device has finished)."""
    order = list(np.arange(calls) % len(sample))
    loop(order[:warmup], lambda i: ranker.score(**rank_feeds(sample, i)))
    latency_ms, _ = loop(order, lambda i: ranker.score(**rank_feeds(sample, i)))
    return percentiles(np.asarray(latency_ms))


def measure(args, srv, export: Path, repo: Path, ranker: TorchRanker, n: int, length: int, out: Path) -> dict:
    """Parity, the closed loop at every concurrency level, the ranking step in process and (where
    installed) locust, for N x L."""
    sample_cfg = SampleConfig(candidates=n, history=length, requests=args.requests)
    sample = random_requests(NUM_ITEMS, NUM_USERS, sample_cfg)
    row = {"N": n, "L": length, "d": args.d, "parity": parity(srv.grpc_url, export, repo, sample)}
    cfg = BenchConfig(
        url=srv.grpc_url,
        metrics_url=f"127.0.0.1:{srv.metrics_port}",
        calls=args.calls,
        sample=sample_cfg,
        processes=args.client_processes,
    )
    for c in args.concurrency:
        timing = closed_loop(cfg, sample, c)
        row[f"c{c}"] = {**timing.row(n), "server": {k: asdict(v) for k, v in timing.server.items()}}
    row["in_process"] = in_process(ranker, sample, args.calls)
    if args.locust_seconds <= 0:
        row["locust"] = "not run (--locust-seconds 0)"
    elif importlib.util.find_spec("locust") is None:
        row["locust"] = "not run (locust is not installed here)"
    else:
        lt = LoadTestConfig(
            url=srv.grpc_url, user_steps=(1, 4, 16), duration_s=args.locust_seconds, sample=sample_cfg
        )
        row["locust"] = run_loadtest(out / f"torch_load_{args.kind}_{n}x{length}", "random ids", lt, sample)[
            "steps"
        ]
    return row


def one_length(args, length: int, ns: list[int], out: Path) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="mmrank-gpu-serving-") as tmp:
        export, repo = Path(tmp) / "export", Path(tmp) / "repo"
        t0 = time.perf_counter()
        params = build(args, length, ns, export, repo)
        built = time.perf_counter() - t0
        ranker = ranker_in_process(repo, params)
        t0 = time.perf_counter()
        # Under NumPy 2 (a bare CUDA image's) the stubs run without the NumPy 1.26 environment, which needs
        # a package index to build: the torch backend's lookup moves every tensor through DLPack.
        dlpack_only = int(np.__version__.split(".")[0]) >= 2
        with TritonServer(TritonConfig(repo, control_mode="explicit", dlpack_only=dlpack_only)) as srv:
            started = time.perf_counter() - t0
            for n in ns:
                row = {
                    **measure(args, srv, export, repo, ranker, n, length, out),
                    "export_s": built,
                    "server_start_s": started,
                }
                rows.append(row)
                print(
                    json.dumps({k: v for k, v in row.items() if k != "locust"}, default=str)[:2000],
                    flush=True,
                )
    return rows


def markdown(report: dict) -> str:
    p = report["provenance"]
    conc = report["concurrency"]
    lines = [
        "# Serving with the torch backend through gRPC",
        "",
        f"Command: `{p['command']}`  ",
        f"Commit: {p['commit']}  ",
        f"Machine: {p['machine']}, {p['platform']}  ",
        f"Device: {report['device']}  ",
        f"Date: {p['date']}",
        "",
        "## Parity (served fp16 scores vs the in-process fp32 graph)",
        "",
        "| N | L | d | max abs difference | top-10 agreement |",
        "|---:|---:|---:|---:|---:|",
        *(
            f"| {r['N']} | {r['L']} | {r['d']} | {r['parity']['max_abs_diff']:.2e} | "
            f"{r['parity']['top10_agreement']:.3f} |"
            for r in report["rows"]
        ),
        "",
        "## Closed loop through gRPC",
        "",
        "| N | L | callers " + LEVEL_HEAD,
        "|---:|---:|---:" + LEVEL_RULE,
        *(f"| {r['N']} | {r['L']} | {c} " + level_cells(r[f"c{c}"]) for r in report["rows"] for c in conc),
        "",
        "Client CPU cores: CPU seconds of the calling processes per wall second; near 1 per process, the "
        "Python client (one GIL each) may limit throughput, not the server.",
        "",
        "## Where the time goes at 1 caller (ms)",
        "",
        "gRPC: `rank` through tritonclient, p50; server: Triton's own means per request (`rank` from "
        "arrival to response, `item_lookup` compute); in process: the same ranking step (lookup, program, "
        "CUDA graphs) called directly in the benchmark's process, p50.",
        "",
        "| N | L | gRPC p50 | server: rank request | server: item_lookup compute | in process p50 | in process p99 |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {r['N']} | {r['L']} | {r['c1']['p50_ms']:.3f} | {r['c1']['server']['rank']['request_us'] / 1e3:.3f} "
            f"| {r['c1']['server'][LOOKUP]['compute_us'] / 1e3:.3f} | {r['in_process']['p50_ms']:.3f} "
            f"| {r['in_process']['p99_ms']:.3f} |"
            for r in report["rows"]
            if "c1" in r
        ),
        "",
        "## Locust (one gRPC call per user at a time)",
        "",
    ]
    for r in report["rows"]:
        shape = f"N={r['N']}, L={r['L']}"
        if isinstance(r["locust"], str):
            lines += [f"{shape}: {r['locust']}.", ""]
        else:
            lines += [
                f"{shape} (run folder torch_load_{report['kind']}_{r['N']}x{r['L']}/):",
                "",
                table(r["locust"]),
            ]
    return "\n".join(lines)


def write(report: dict, out: Path) -> str:
    """JSON, markdown and plot of the rows so far (rewritten after each history length, so a run cut
    short by its time limit still leaves what it measured)."""
    stem = out / f"torch_serving_latency_{report['kind']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    text = markdown(report)
    stem.with_suffix(".md").write_text(text)
    plot(report, stem.with_suffix(".png"))
    return text


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in report["rows"]:
        xs = [r[f"c{c}"]["candidates_per_s"] for c in report["concurrency"]]
        ys = [r[f"c{c}"]["p99_ms"] for c in report["concurrency"]]
        ax.plot(xs, ys, marker="o", label=f"N={r['N']}, L={r['L']}")
    ax.set_xlabel("candidates / s")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_title(f"rank over gRPC, torch backend ({report['device']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results", help="folder for torch_serving_latency_{gpu,cpu}.*")
    p.add_argument("--shapes", default="100x50,500x50,100x1000,500x1000", help="NxL pairs")
    p.add_argument("--concurrency", default="1,4,16", help="closed-loop callers per level")
    p.add_argument("--calls", type=int, default=300, help="timed calls per level")
    p.add_argument("--requests", type=int, default=64, help="distinct requests per shape (parity: all)")
    p.add_argument("--d", type=int, default=128, help="content width")
    p.add_argument("--preset", default="em3")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp16")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument(
        "--client-processes", type=int, default=1, help="closed-loop client processes per level (GIL ceiling)"
    )
    p.add_argument("--locust-seconds", type=float, default=5.0, help="per locust user step (0: no locust)")
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "CPU"
    args.kind = "cpu" if device == "CPU" else "gpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shapes = parse_shapes(args.shapes)
    report = {
        "provenance": record(["python", "benchmarks/gpu_serving.py", *argv]),
        "device": f"{device}, torch {torch.__version__}, {args.precision}",
        "kind": args.kind,
        "concurrency": args.concurrency,
        "rows": [],
    }
    for length in sorted({length for _, length in shapes}):
        ns = [n for n, l_ in shapes if l_ == length]
        report["rows"] += one_length(args, length, ns, out)
        text = write(report, out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
