"""Closed-loop latency of the served `rank` ensemble and where its time goes (no locust).

    python benchmarks/serving_latency.py --url 127.0.0.1:8001 --metrics-url 127.0.0.1:8002 \
        --repo build/em3_repo --data build/ml100k --out benchmarks/results/serving_latency_ml100k.md

Against a running server (`mmrank serve --repo REPO --control-mode none`), with requests drawn from the
dataset the served model was trained on (clients/request_sample.py: real test histories of L items,
N candidates):

1. Concurrency levels (--concurrency): c threads, each with its own gRPC channel, call `rank` back to
   back until --calls calls are done, spread over --client-processes processes where one Python
   process (one GIL) would cap the rate. Percentiles are exact (nearest rank over every call).
2. Breakdown at concurrency 1, the same requests each way, one pass each: `rank` (the ensemble),
   `item_lookup` alone where `rank` is an ensemble over it (with the python backend it runs the ranking
   graph as well: `rank` is one step; the native merged `rank` is the table model itself), `ranking`
   alone (fed the lookup's products computed here), the lookup + ranking graph in-process (the serving
   runtime's own lookup on the repository's item table and model.onnx with onnxruntime), and the graph
   alone in-process.

Around every level and pass, Triton's Prometheus counters (clients/triton_metrics.py) are read before
and after, giving each model's queue and compute time per request as the server measured them.
Failed calls are counted, never retried.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from clients.loadtest import check_loopback, check_ready, parse_user_steps, percentiles
from clients.request_sample import RequestSample, SampleConfig, draw_requests
from clients.triton_metrics import ModelTimes, per_request, settled_scrape
from common.errors import MMRankError
from common.provenance import record
from export.manifest import ModelInfo
from export.repository import table_model
from model_repository import item_table as it
from model_repository.ort_graph import OrtGraph

LOOKUP, RANKING, RANK = "item_lookup", "ranking", "rank"
RANK_PASS, LOOKUP_PASS = "rank (gRPC)", "item_lookup (gRPC)"
IN_PROCESS = "lookup + ranking graph, in-process"


@dataclass(frozen=True)
class BenchConfig:
    url: str = "127.0.0.1:8001"  # Triton gRPC (loopback only)
    metrics_url: str = "127.0.0.1:8002"  # Triton metrics port
    concurrency: tuple[int, ...] = (1, 2, 4, 8)  # closed-loop callers per level
    calls: int = 400  # calls per concurrency level and per breakdown pass
    warmup: int = 20  # untimed calls before each level and pass
    sample: SampleConfig = field(default_factory=SampleConfig)
    timeout_s: float = 5.0  # per call; a slower call is a failure
    processes: int = 1  # client processes a level's callers are spread over (past one Python process's GIL)


class Caller:
    """One gRPC channel; `infer(model, feeds)` sends numpy arrays by name, returns the named outputs."""

    def __init__(self, url: str, timeout_s: float):
        import tritonclient.grpc as grpcclient

        self.module, self.timeout_s = grpcclient, timeout_s
        self.client = grpcclient.InferenceServerClient(url=url)

    def infer(self, model: str, feeds: dict[str, np.ndarray], outputs: list[str] | None = None):
        from tritonclient.utils import np_to_triton_dtype

        inputs = []
        for name, value in feeds.items():
            tensor = self.module.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        wanted = [self.module.InferRequestedOutput(n) for n in outputs] if outputs else None
        result = self.client.infer(model, inputs, outputs=wanted, client_timeout=self.timeout_s)
        return {n: result.as_numpy(n) for n in outputs} if outputs else result

    def input_names(self, model: str) -> list[str]:
        return [t["name"] for t in self.client.get_model_metadata(model, as_json=True)["inputs"]]

    def close(self) -> None:
        self.client.close()


def served_lookup(repo: Path) -> tuple[Path, it.ItemTable, it.LookupConfig]:
    """The table model's newest version folder of the repository, its item table and the lookup config."""
    manifest = repo / "export_manifest.json"
    if not manifest.is_file():
        raise MMRankError(f"--repo {repo}: no export_manifest.json, not a repository of `mmrank repo`")
    cfg = ModelInfo(**json.loads(manifest.read_text())["model"]).lookup()
    model = table_model(repo)
    folder = model / str(it.table_versions(model)[-1])
    return folder, it.ItemTable.read(folder / "item_table"), cfg


def lookup_in_process(repo: Path):
    """The serving runtime's own lookup on the repository's item table: (i, sample) -> the ranking
    graph's inputs for request i, computed here as item_lookup computes them in the server."""
    _, table, cfg = served_lookup(repo)

    def run(i: int, sample: RequestSample) -> dict[str, np.ndarray]:
        f = rank_feeds(sample, i)
        return it.rank_inputs(table, cfg, f["history_ids"], f["candidate_ids"], f["user_id"][:, 0])

    return run


def rank_feeds(sample: RequestSample, i: int) -> dict[str, np.ndarray]:
    """The `rank` ensemble's (and item_lookup's) request tensors, batch of one."""
    return {
        "history_ids": sample.histories[i][None],
        "candidate_ids": sample.candidates[i][None],
        "user_id": sample.users[i : i + 1][None],
    }


@dataclass
class Timing:
    latency_ms: np.ndarray
    failures: int
    seconds: float
    server: dict[str, ModelTimes]
    # CPU seconds of the client (this process and its caller processes) per wall second: near 1 per
    # client process with many callers, the Python client (one GIL each) may limit throughput, not the server.
    client_cores: float

    def row(self, candidates: int) -> dict:
        ok = len(self.latency_ms) - self.failures
        return {
            "calls": len(self.latency_ms),
            "failures": self.failures,
            **percentiles(self.latency_ms),
            "mean_ms": float(self.latency_ms.mean()),
            "requests_per_s": ok / self.seconds,
            "candidates_per_s": ok * candidates / self.seconds,
            "client_cores": self.client_cores,
        }


def measured(cfg: BenchConfig, run) -> Timing:
    """`run()` -> (latencies ms, failures), timed, with Triton's counters read around it."""
    before = settled_scrape(cfg.metrics_url)
    t0, cpu0 = time.perf_counter(), time.process_time()
    latency_ms, failures = run()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    server = per_request(before, settled_scrape(cfg.metrics_url))
    return Timing(np.asarray(latency_ms), failures, seconds, server, cpu / seconds)


def loop(calls: list, fn) -> tuple[list[float], int]:
    """Call `fn(x)` for each x back to back; every call's latency, failed ones included."""
    from tritonclient.utils import InferenceServerException

    latency, failures = [], 0
    for x in calls:
        t = time.perf_counter()
        try:
            fn(x)
        except InferenceServerException:
            failures += 1
        latency.append((time.perf_counter() - t) * 1e3)
    return latency, failures


class CallerThreads:
    """Threads of this process, one gRPC channel each, that call `rank` back to back over their shares
    of the requests (warmed up on construction)."""

    def __init__(self, cfg: BenchConfig, sample: RequestSample, shares: list[np.ndarray]):
        self.sample, self.shares = sample, shares
        self.callers = [Caller(cfg.url, cfg.timeout_s) for _ in shares]
        for c in self.callers:
            loop(range(cfg.warmup), lambda i, c=c: c.infer(RANK, rank_feeds(sample, i % len(sample))))

    def run(self) -> tuple[list[float], int]:
        results: list[tuple[list[float], int]] = [([], 0)] * len(self.callers)

        def worker(k: int) -> None:
            c = self.callers[k]
            results[k] = loop(list(self.shares[k]), lambda i: c.infer(RANK, rank_feeds(self.sample, i)))

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(self.callers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [x for lat, _ in results for x in lat], sum(f for _, f in results)

    def close(self) -> None:
        for c in self.callers:
            c.close()


def _process_worker(cfg: BenchConfig, sample: RequestSample, shares, barrier, results) -> None:
    """One client process: warm up, say so, wait for the parent's go (it reads the server's counters
    in between), call, hand back (latencies, failures, CPU seconds of the timed part). A failure breaks
    the barrier, so the parent hears of it at once."""
    try:
        threads = CallerThreads(cfg, sample, shares)
        try:
            barrier.wait()
            barrier.wait()
            cpu0 = time.process_time()
            latency, failures = threads.run()
            results.put((latency, failures, time.process_time() - cpu0))
        finally:
            threads.close()
    except BaseException:
        barrier.abort()
        raise


def closed_loop(cfg: BenchConfig, sample: RequestSample, concurrency: int) -> Timing:
    """`concurrency` callers back to back until cfg.calls calls are done, spread over up to
    cfg.processes client processes (one process's GIL caps how many calls it can send)."""
    shares = np.array_split(np.arange(cfg.calls) % len(sample), concurrency)
    processes = min(cfg.processes, concurrency)
    if processes <= 1:
        threads = CallerThreads(cfg, sample, shares)
        try:
            return measured(cfg, threads.run)
        finally:
            threads.close()
    ctx = mp.get_context("spawn")  # a forked child would inherit the parent's gRPC state
    barrier, results = ctx.Barrier(processes + 1), ctx.Queue()
    procs = [
        ctx.Process(target=_process_worker, args=(cfg, sample, shares[k::processes], barrier, results))
        for k in range(processes)
    ]
    worker_cpu = []
    limit = 120 + cfg.calls * cfg.timeout_s / concurrency

    def run():
        barrier.wait(timeout=limit)
        got = [results.get(timeout=limit) for _ in procs]
        worker_cpu.append(sum(g[2] for g in got))
        return [x for g in got for x in g[0]], sum(g[1] for g in got)

    for proc in procs:
        proc.start()
    try:
        barrier.wait(timeout=limit)
        timing = measured(cfg, run)
    except (threading.BrokenBarrierError, queue.Empty) as e:
        codes = [proc.exitcode for proc in procs]
        raise MMRankError(f"a closed-loop client process failed or hung (exit codes {codes}): {e!r}") from e
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
    return replace(timing, client_cores=timing.client_cores + worker_cpu[0] / timing.seconds)


def breakdown(
    cfg: BenchConfig, sample: RequestSample, graph: OrtGraph, lookup, ensemble: bool
) -> dict[str, Timing]:
    """Each pass of the breakdown; `item_lookup` alone where `rank` is an `ensemble` over it."""
    caller = Caller(cfg.url, cfg.timeout_s)
    graph_inputs = [t.name for t in graph.session.get_inputs()]
    # Triton carries a per-row scalar (user_id) as [batch, 1]; the graph itself takes [batch].
    config_ranks = {
        t["name"]: len(t["shape"]) for t in caller.client.get_model_metadata(RANKING, as_json=True)["inputs"]
    }
    order = list(np.arange(cfg.calls) % len(sample))
    feeds = {i: {n: lookup(i, sample)[n] for n in graph_inputs} for i in sorted(set(order))}
    served_feeds = {
        i: {n: x.reshape(*x.shape, *([1] * (config_ranks[n] - x.ndim))) for n, x in f.items()}
        for i, f in feeds.items()
    }
    passes = {RANK_PASS: lambda i: caller.infer(RANK, rank_feeds(sample, i))}
    if ensemble:
        passes[LOOKUP_PASS] = lambda i: caller.infer(LOOKUP, rank_feeds(sample, i))
    passes |= {
        "ranking (gRPC)": lambda i: caller.infer(RANKING, served_feeds[i]),
        IN_PROCESS: lambda i: graph.run({n: lookup(i, sample)[n] for n in graph_inputs}),
        "ranking graph, in-process onnxruntime": lambda i: graph.run(feeds[i]),
    }
    out = {}
    try:
        for name, fn in passes.items():
            loop(order[: cfg.warmup], fn)
            out[name] = measured(cfg, lambda fn=fn: loop(order, fn))
    finally:
        caller.close()
    return out


def _server_table(title: str, rows: dict[str, dict[str, ModelTimes]]) -> list[str]:
    lines = [
        f"| {title} | model | requests | batch | queue us/req | compute us/req | (infer) | request us/req |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, models in rows.items():
        for model, t in models.items():
            lines.append(
                f"| {label} | {model} | {t.requests} | {t.batch:.2f} | {t.queue_us:.0f} | {t.compute_us:.0f} "
                f"| {t.infer_us:.0f} | {t.request_us:.0f} |"
            )
    return lines


LEVEL_HEAD = (
    "| calls | failures | p50 ms | p95 ms | p99 ms | mean ms | requests/s | candidates/s | client CPU cores |"
)
LEVEL_RULE = "|---:" * 9 + "|"


def level_cells(r: dict) -> str:
    """A closed-loop level (`Timing.row`) as the cells under LEVEL_HEAD."""
    return (
        f"| {r['calls']} | {r['failures']} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} "
        f"| {r['mean_ms']:.2f} | {r['requests_per_s']:.1f} | {r['candidates_per_s']:,.0f} "
        f"| {r['client_cores']:.2f} |"
    )


def markdown(report: dict) -> str:
    p, cfg = report["provenance"], report["config"]
    n, length = cfg["sample"]["candidates"], cfg["sample"]["history"]
    lines = [
        "# Served `rank` latency: closed loop and ensemble breakdown",
        "",
        f"Command: `{p['command']}`  ",
        f"Commit: {p['commit']}  ",
        f"Machine: {p['machine']}, {p['platform']}  ",
        f"Date: {p['date']}; 1-minute load average before / after: {p['load_average_1min']:.2f} / "
        f"{report['load_average_after']:.2f} (the CPU is shared with other jobs)  ",
        f"Requests: {report['requests']} distinct test requests of `{report['data']}`, N={n} candidates, "
        f"L={length} history items; {cfg['calls']} timed calls per row after {cfg['warmup']} warm-up calls.",
        "",
        "## Closed loop",
        "",
        "| callers " + LEVEL_HEAD,
        "|---:" + LEVEL_RULE,
    ]
    lines += [f"| {c} " + level_cells(r) for c, r in report["closed_loop"].items()]
    lines += ["", "Server side (Triton metrics, per successful request):", ""]
    lines += _server_table("callers", report["closed_loop_server"])
    lines += [
        "",
        "## Breakdown at 1 caller",
        "",
        "| path | p50 ms | p95 ms | p99 ms | mean ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in report["breakdown"].items():
        lines.append(
            f"| {name} | {r['p50_ms']:.3f} | {r['p95_ms']:.3f} | {r['p99_ms']:.3f} | {r['mean_ms']:.3f} |"
        )
    lines += ["", "Server side (Triton metrics, per successful request):", ""]
    lines += _server_table("pass", report["breakdown_server"])
    o = report["overhead_p50_ms"]
    said = (
        f"rank minus the same lookup + graph in-process = {o['served_vs_in_process']:.3f} ms "
        "(what serving costs over the computation)"
    )
    if "ensemble_vs_lookup" in o:
        said += (
            f"; rank minus item_lookup called directly = {o['ensemble_vs_lookup']:.3f} ms (the ensemble step "
            "itself: with the python backend item_lookup runs the ranking graph too, so `rank` is one step)"
        )
    lines += ["", f"p50 differences: {said}.", ""]
    return "\n".join(lines)


def run(cfg: BenchConfig, repo: Path, data: Path, argv: list[str]) -> dict:
    check_loopback(cfg.url)
    check_loopback(cfg.metrics_url, "--metrics-url")
    # Everything a step needs is checked before the first one: a bad input found after minutes of
    # measuring would lose them.
    graph = OrtGraph(repo / RANKING / "1" / "model.onnx")
    lookup = lookup_in_process(repo)
    check_ready(cfg.url, RANK)
    sample = draw_requests(data, cfg.sample)
    report = {
        "provenance": record(["python", *argv]),
        "config": asdict(cfg),
        "data": str(data),
        "requests": len(sample),
    }
    levels = {c: closed_loop(cfg, sample, c) for c in cfg.concurrency}
    report["closed_loop"] = {c: t.row(cfg.sample.candidates) for c, t in levels.items()}
    report["closed_loop_server"] = {c: t.server for c, t in levels.items()}
    passes = breakdown(cfg, sample, graph, lookup, (repo / LOOKUP).is_dir())
    report["breakdown"] = {name: t.row(cfg.sample.candidates) for name, t in passes.items()}
    report["breakdown_server"] = {name: t.server for name, t in passes.items()}
    p50 = {name: r["p50_ms"] for name, r in report["breakdown"].items()}
    report["overhead_p50_ms"] = {"served_vs_in_process": p50[RANK_PASS] - p50[IN_PROCESS]}
    if LOOKUP_PASS in p50:
        report["overhead_p50_ms"]["ensemble_vs_lookup"] = p50[RANK_PASS] - p50[LOOKUP_PASS]
    report["load_average_after"] = os.getloadavg()[0]
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=d.url, help=f"Triton gRPC address (default {d.url})")
    p.add_argument(
        "--metrics-url", default=d.metrics_url, help=f"Triton metrics address (default {d.metrics_url})"
    )
    p.add_argument("--repo", required=True, help="the served model repository (for the in-process graph)")
    p.add_argument("--data", required=True, help="dataset folder the served model was trained on")
    p.add_argument("--concurrency", default="1,2,4,8", help="callers per level (default 1,2,4,8)")
    p.add_argument(
        "--calls", type=int, default=d.calls, help=f"timed calls per level and pass (default {d.calls})"
    )
    p.add_argument("--warmup", type=int, default=d.warmup, help=f"untimed calls first (default {d.warmup})")
    p.add_argument(
        "--client-processes",
        type=int,
        default=d.processes,
        help=f"client processes the callers of a level are spread over (default {d.processes})",
    )
    p.add_argument("--candidates", type=int, default=d.sample.candidates, help="N (default 100)")
    p.add_argument("--history", type=int, default=d.sample.history, help="L (default 50)")
    p.add_argument("--out", required=True, help="markdown report; a .json with the same stem beside it")
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        cfg = BenchConfig(
            url=args.url,
            metrics_url=args.metrics_url,
            concurrency=parse_user_steps(args.concurrency, "--concurrency"),
            calls=args.calls,
            warmup=args.warmup,
            sample=SampleConfig(candidates=args.candidates, history=args.history),
            processes=args.client_processes,
        )
        report = run(cfg, Path(args.repo), Path(args.data), ["benchmarks/serving_latency.py", *argv])
    except MMRankError as e:
        print(f"serving_latency: error: {e}", file=sys.stderr)
        return 1
    out.write_text(markdown(report))
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=lambda o: asdict(o)))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
