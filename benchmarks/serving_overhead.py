"""What the `rank` ensemble adds over the same computation in process, and where the served time goes.

    python benchmarks/serving_overhead.py [--out benchmarks/results/serving_overhead.md] [--calls 400]

Model: the `em3` preset's ranking graph with its history length set to L (random weights on the
ML-100K-sized schema of benchmarks/export_latency.py: latency depends on shapes, not on weights),
exported and rendered as a python-backend repository (`mmrank repo` defaults), served by the real
tritonserver on loopback. One user ranks N candidates against an L-item history.

- in process: `item_table.rank_inputs` + the ranking graph in onnxruntime (the same computation as the
  served one, same onnxruntime thread count), and the graph alone;
- served: `rank` over gRPC with the sync tritonclient, one caller; `calls` calls of each path after
  warm-up, in alternating rounds so that all paths see the same load on a shared CPU: p50, p99.
  Overhead = served p50 - in-process p50. Beside it, the same call of item_lookup directly (what the
  ensemble adds) and of `floor`, a Python-backend model rendered into the benchmark's repository with
  item_lookup's inputs, outputs and batching that does no work: the round trip that any Python step
  costs here, gRPC included. Where the time went: Triton's own statistics per model over
  the same calls (queue, compute input / infer / output), the rest is gRPC and the client.
- 8 concurrent callers (one client each), `calls` calls each: p50, p99, failures.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.export_latency import build_model, machine, timed  # noqa: E402
from common.provenance import code_commit  # noqa: E402
from export.onnx_graphs import ExportConfig, export_model  # noqa: E402
from export.repository import RenderConfig, render_repository  # noqa: E402
from export.triton_launcher import TritonConfig, TritonServer  # noqa: E402
from model_repository import item_table as it  # noqa: E402
from model_repository.ort_graph import OrtGraph  # noqa: E402

MODELS = ("rank", "item_lookup", "ranking", "floor")
STAT_PARTS = ("queue", "compute_input", "compute_infer", "compute_output")
ROUNDS = 10
DIRECT = "served: item_lookup directly"
FLOOR = "served: floor (a Python step doing no work)"


FLOOR_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            shape = pb_utils.get_input_tensor_by_name(request, "candidate_ids").as_numpy().shape
            scores = pb_utils.Tensor("scores", np.zeros(shape, np.float32))
            known = pb_utils.Tensor("candidate_known", np.ones(shape, bool))
            responses.append(pb_utils.InferenceResponse(output_tensors=[scores, known]))
        return responses
"""


def add_floor_model(repo: Path) -> None:
    """`floor`: item_lookup's config (inputs, outputs, batching, instances) without its parameters, and a
    model that answers zeros at once."""
    config = (repo / "item_lookup" / "config.pbtxt").read_text()
    config = re.sub(
        r'parameters \{\n  key: "[^"]*"\n  value \{\n    string_value: .*\n  \}\n\}\n', "", config
    )
    (repo / "floor" / "1").mkdir(parents=True)
    (repo / "floor" / "config.pbtxt").write_text(config.replace('name: "item_lookup"', 'name: "floor"', 1))
    (repo / "floor" / "1" / "model.py").write_text(FLOOR_MODEL)


def percentiles(ms: list[float]) -> tuple[float, float]:
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def request(n: int, length: int, num_items: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.integers(1, num_items + 1, (1, length)).astype(np.int64),
        rng.integers(1, num_items + 1, (1, n)).astype(np.int64),
    )


def in_process(export: Path, hist: np.ndarray, cands: np.ndarray, threads: int) -> dict[str, Callable]:
    from export.manifest import Manifest

    manifest = Manifest.read(export)
    table = it.ItemTable.read(export / "item_table")
    lookup = manifest.model.lookup()
    spec = manifest.graph("ranking")
    graph = OrtGraph(export / spec.file, threads=threads)
    feeds = it.rank_inputs(table, lookup, hist, cands)
    graph_feeds = {t.name: feeds[t.name] for t in spec.inputs}

    def whole():
        f = it.rank_inputs(table, lookup, hist, cands)
        graph.run({t.name: f[t.name] for t in spec.inputs})

    return {"lookup + graph": whole, "graph only": lambda: graph.run(graph_feeds)}


def _inputs(grpc, hist, cands):
    out = []
    for name, arr in (("history_ids", hist), ("candidate_ids", cands)):
        t = grpc.InferInput(name, list(arr.shape), "INT64")
        t.set_data_from_numpy(arr)
        out.append(t)
    return out


def model_stats(client) -> dict[str, dict[str, float]]:
    """Cumulative {model: {part: ns, "count": n}} from Triton's statistics endpoint."""
    out = {}
    for s in client.get_inference_statistics(as_json=True)["model_stats"]:
        if s["name"] in MODELS:
            inf = s["inference_stats"]
            parts = {p: float(inf.get(p, {}).get("ns", 0)) for p in STAT_PARTS}
            parts["count"] = float(inf.get("success", {}).get("count", 0))
            parts["success_ns"] = float(inf.get("success", {}).get("ns", 0))
            out[s["name"]] = parts
    return out


def one_caller(url: str, hist, cands, local: dict[str, Callable], calls: int) -> tuple[dict, dict]:
    """Served calls and in-process calls in alternating rounds, so both see the same load on a shared
    CPU: ({path: ms list}, Triton's statistics over the served calls)."""
    import tritonclient.grpc as grpc

    client = grpc.InferenceServerClient(url)
    inputs = _inputs(grpc, hist, cands)
    paths = {
        **{f"in process: {k}": fn for k, fn in local.items()},
        "served": lambda: client.infer("rank", inputs),
        DIRECT: lambda: client.infer("item_lookup", inputs),
        FLOOR: lambda: client.infer("floor", inputs),
    }
    for fn in paths.values():
        timed(fn, 0, warmup=20)
    before = model_stats(client)
    ms: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(ROUNDS):
        for name, fn in paths.items():
            ms[name] += timed(fn, calls // ROUNDS, warmup=2)
    after = model_stats(client)
    return ms, {m: {k: after[m][k] - before[m][k] for k in after[m]} for m in after if m in before}


def served(url: str, hist, cands, calls: int, callers: int) -> tuple[list[float], int]:
    import tritonclient.grpc as grpc

    clients = [grpc.InferenceServerClient(url) for _ in range(callers)]
    inputs = _inputs(grpc, hist, cands)
    for c in clients:
        timed(lambda c=c: c.infer("rank", inputs), 0, warmup=20)
    failures = []

    def one(c) -> list[float]:
        def call():
            try:
                c.infer("rank", inputs, client_timeout=10)
            except Exception as e:  # every failure counts, whatever its kind
                failures.append(e)

        return timed(call, calls, warmup=0)

    with ThreadPoolExecutor(callers) as pool:
        ms = [t for part in pool.map(one, clients) for t in part]
    return ms, len(failures)


def breakdown(delta: dict) -> list[tuple[str, float]]:
    """Average ms per request of each model's parts (an ensemble's total is its success time)."""
    rows = []
    for model in MODELS:
        d = delta.get(model)
        if not d or not d["count"]:
            continue
        if model == "rank":
            rows.append(("rank ensemble, server side total", d["success_ns"] / d["count"] / 1e6))
            continue
        for part in STAT_PARTS:
            rows.append((f"{model}: {part}", d[part] / d["count"] / 1e6))
    return rows


def build(out: Path, history_len: int, rc: RenderConfig) -> Path:
    model = build_model("em3", history_len=history_len)
    export = out / "export"
    export_model(model, export, {"path": "random-init", "sha256": "0" * 64}, None, ExportConfig(fp16=False))
    render_repository(export, out / "repo", rc)
    return export


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/serving_overhead.md")
    p.add_argument("--calls", type=int, default=400, help="measured calls per caller")
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--history", type=int, default=50)
    p.add_argument("--lookup-instances", type=int, default=RenderConfig.lookup_instances)
    p.add_argument("--graph-threads", type=int, default=RenderConfig.rank_graph_threads)
    args = p.parse_args(argv)
    rc = RenderConfig(
        backend="python", lookup_instances=args.lookup_instances, rank_graph_threads=args.graph_threads
    )
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="mmrank-overhead-") as tmp:
        export = build(Path(tmp), args.history, rc)
        add_floor_model(Path(tmp) / "repo")
        hist, cands = request(args.candidates, args.history, 1682)
        local = in_process(export, hist, cands, args.graph_threads)
        with TritonServer(TritonConfig(Path(tmp) / "repo", control_mode="explicit")) as server:
            one, stats = one_caller(server.grpc_url, hist, cands, local, args.calls)
            eight, fail8 = served(server.grpc_url, hist, cands, args.calls, 8)
    results = {
        "one": {k: percentiles(v) for k, v in one.items()},
        "eight": (*percentiles(eight), fail8),
        "breakdown": breakdown(stats),
        "load": (load_before, os.getloadavg()[0]),
    }
    write(results, args, Path(args.out))
    print(Path(args.out).read_text())
    return 0


def write(r: dict, args, path: Path) -> None:
    one = {name: p50 for name, (p50, _) in r["one"].items()}
    local_p50, served_p50 = one["in process: lookup + graph"], one["served"]
    floor_p50, direct_p50 = one[FLOOR], one[DIRECT]
    lines = [
        "# Serving overhead: the `rank` ensemble vs the same computation in process",
        "",
        f"Command: `python benchmarks/serving_overhead.py --calls {args.calls} --candidates {args.candidates} "
        f"--history {args.history} --lookup-instances {args.lookup_instances} "
        f"--graph-threads {args.graph_threads}`  ",
        f"Commit: {code_commit()}  ",
        f"Machine: {machine()}  ",
        f"1-minute load average before / after: {r['load'][0]:.2f} / {r['load'][1]:.2f} "
        "(the CPU is shared with other jobs)",
        "",
        f"em3 ranking graph (history length {args.history}), N={args.candidates} candidates, one user per "
        f"request; python-backend repository, {args.lookup_instances} item_lookup instance(s), ranking graph "
        f"on {args.graph_threads} onnxruntime thread(s) (0 = its default) in the server and in process.",
        "",
        "| path | p50 (ms) | p99 (ms) | failures |",
        "|---|---:|---:|---:|",
    ]
    for name, (p50, p99) in r["one"].items():
        lines.append(
            f"| {name}{', 1 caller' if name.startswith('served') else ''} | {p50:.3f} | {p99:.3f} | |"
        )
    lines.append(f"| served, 8 callers | {r['eight'][0]:.3f} | {r['eight'][1]:.3f} | {r['eight'][2]} |")
    lines += [
        "",
        f"Overhead (served p50, 1 caller, minus in-process lookup + graph p50): "
        f"**{served_p50 - local_p50:.3f} ms** (1 caller: {args.calls} calls of each path in {ROUNDS} "
        "alternating rounds; a failed served call raises)",
        "",
        f"Of it, the Python step's own round trip (`floor` p50, gRPC included, no work): {floor_p50:.3f} ms; "
        f"served minus floor: {served_p50 - floor_p50:.3f} ms for a computation that takes {local_p50:.3f} ms "
        f"in process (so {served_p50 - floor_p50 - local_p50:+.3f} ms beyond the floor), and the ensemble "
        f"over calling item_lookup directly: {served_p50 - direct_p50:+.3f} ms.",
        "",
        "Where the served time went (1 caller; Triton's statistics, mean ms per request):",
        "",
        "| part | ms |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {ms:.3f} |" for name, ms in r["breakdown"]]
    lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
