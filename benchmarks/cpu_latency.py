"""Served `rank` with the machine's own CPU idle states and with the CPU wake-up latency limit held at 0 us,
alternating in the same run: what idle CPUs that halt cost a served request.

    sudo python benchmarks/cpu_latency.py [--rounds 6] [--calls 300]
        [--out benchmarks/results/serving_overhead_native_cpu_latency_paired.md]   # + .json and .png

The em3 ranking graph (L=50, random weights on the ML-100K-sized schema, as
benchmarks/serving_overhead.py) is exported once and rendered with `mmrank repo` defaults for the python
and the native backend; both servers run at once. Each round measures every path under both settings, in
turn (the order swaps every round, so drift falls on both alike): with the machine's own idle states, and
with the limit held at 0 us (common/cpu_latency.py: idle CPUs poll instead of halting; the in-process
timings too). Paths: the in-process computation of each backend (the native one on the server's own ONNX
Runtime where the backend build kept its wheel), `rank` served to 1 caller, a gRPC round trip without a
model, then 8 caller processes per server. Overhead = served p50 - in-process p50, per setting. Holding
the limit needs root.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.serving_overhead import (  # noqa: E402
    BACKENDS,
    NUM_ITEMS,
    ServerRuntime,
    caller_processes,
    export_em3,
    in_process,
    measured,
    native_in_process,
    percentiles,
    request,
    request_tensors,
    save,
    serve,
    timed_batch,
)
from common.cpu_latency import NO_LIMIT_US, CpuLatencyHold, current_limit_us  # noqa: E402
from common.errors import MMRankError  # noqa: E402
from export.repository import RenderConfig, render_repository, table_model  # noqa: E402

SETTINGS = ("own idle states", "held at 0 us")
CALLERS = 8
LIVE = "gRPC round trip, no model"
SETTLE_S = 0.2  # after switching the setting, before timing


def paths(export: Path, repos: dict[str, Path], servers: dict, hist, cands, tmp: Path) -> tuple[dict, list]:
    """{name: call} for one caller, in process and served; the ServerRuntime to close after."""
    import tritonclient.grpc as grpc

    threads = RenderConfig.rank_graph_threads
    native_file = table_model(repos["native"]) / "1" / "model.onnx"
    out = {"python: in process": in_process(export, hist, cands, threads)["lookup + graph"]}
    children = []
    try:  # the native overhead counts against the server's own ONNX Runtime where its wheel is kept
        children.append(ServerRuntime(native_file, hist, cands, threads, tmp))
        out["native: in process"] = children[0]
    except FileNotFoundError as e:
        print(f"native in process on this venv's onnxruntime: {e} is missing", file=sys.stderr)
        out["native: in process"] = native_in_process(native_file, hist, cands, threads)
    inputs = request_tensors(grpc, hist, cands)
    for name, server in servers.items():
        client = grpc.InferenceServerClient(server.grpc_url)
        out[f"{name}: served"] = lambda c=client: c.infer("rank", inputs)
    out[LIVE] = grpc.InferenceServerClient(servers["native"].grpc_url).is_server_live
    return out, children


def one_setting(calls_of: dict, servers: dict, hist, cands, calls: int) -> dict:
    """{"ms": {path: timings}, "failures": {server: failed calls of its caller processes}}."""
    ms = {name: timed_batch(fn, calls, warmup=2) for name, fn in calls_of.items()}
    failures = {}
    for name, server in servers.items():
        ms[f"{name}: {CALLERS} caller processes"], failures[name] = caller_processes(
            server.grpc_url, hist, cands, calls, CALLERS
        )
    return {"ms": ms, "failures": failures}


def measure(args, tmp: Path) -> dict:
    hold = CpuLatencyHold(0)
    with hold:  # fail before any work where this machine cannot hold the limit
        pass
    export = export_em3(tmp, args.history)
    repos = {name: tmp / name for name in BACKENDS}
    for name, backend in BACKENDS.items():
        render_repository(export, repos[name], RenderConfig(backend=backend))
    hist, cands = request(args.candidates, args.history, NUM_ITEMS)
    servers = {name: serve(repo, None) for name, repo in repos.items()}
    children = []
    rounds = []
    try:
        calls_of, children = paths(export, repos, servers, hist, cands, tmp)
        for fn in calls_of.values():
            timed_batch(fn, 0, warmup=20)
        for r in range(args.rounds):
            order = SETTINGS if r % 2 == 0 else SETTINGS[::-1]
            per = {}
            for setting in order:
                if setting == SETTINGS[1]:
                    hold.acquire()
                try:
                    time.sleep(SETTLE_S)
                    per[setting] = one_setting(calls_of, servers, hist, cands, args.calls)
                finally:
                    hold.release()
            rounds.append(per)
            line = "; ".join(f"{s}: native overhead {overhead(per[s], 'native'):.3f} ms" for s in SETTINGS)
            print(f"round {r + 1}/{args.rounds}: {line}", file=sys.stderr, flush=True)
    finally:
        for server in servers.values():
            server.stop()
        for child in children:
            child.close()
    return summarize(rounds)


def overhead(setting: dict, backend: str) -> float:
    ms = setting["ms"]
    return float(np.median(ms[f"{backend}: served"]) - np.median(ms[f"{backend}: in process"]))


def summarize(rounds: list[dict]) -> dict:
    pooled = {}
    for setting in SETTINGS:
        pooled[setting] = {
            "paths": {
                k: percentiles([t for r in rounds for t in r[setting]["ms"][k]])
                for k in rounds[0][setting]["ms"]
            },
            "failures": {b: sum(r[setting]["failures"][b] for r in rounds) for b in BACKENDS},
        }
        p = pooled[setting]["paths"]
        pooled[setting]["overhead"] = {b: p[f"{b}: served"][0] - p[f"{b}: in process"][0] for b in BACKENDS}
    per_round = [{s: {b: overhead(r[s], b) for b in BACKENDS} for s in SETTINGS} for r in rounds]
    return {"pooled": pooled, "rounds": per_round}


def write_report(r: dict, path: Path) -> None:
    prov, s = r["provenance"], r["settings"]
    own, held = (r["pooled"][k] for k in SETTINGS)
    rows = []
    for name in own["paths"]:
        (a50, a99), (b50, b99) = own["paths"][name], held["paths"][name]
        rows.append(f"| {name} | {a50:.3f} | {b50:.3f} | {b50 - a50:+.3f} | {a99:.3f} | {b99:.3f} |")
    ratio = {k: v["overhead"]["native"] / v["overhead"]["python"] for k, v in r["pooled"].items()}
    lines = [
        "# Served `rank` with the machine's own CPU idle states and with the wake-up latency held at 0 us",
        "",
        f"Command: `{prov['command']}`  ",
        f"Commit: {prov['commit']}  ",
        f"Machine: {prov['machine']}; CPU wake-up latency limit before the run: {s['limit_before']}  ",
        f"Date: {prov['date']}; 1-minute load average before / after: {prov['load_average_1min']:.2f} / "
        f"{prov['load_average_1min_after']:.2f} (a shared CPU inflates every number, p99 most)",
        "",
        f"em3 ranking graph (L={s['history']}), N={s['candidates']} candidates, one user per request; "
        "`mmrank repo` defaults, python and native servers up at once. "
        f"{s['rounds']} rounds; each measures every path under both settings in turn (the order swapping "
        f"every round): {s['calls']} calls per path from 1 caller, then {s['calls']} calls from each of "
        f"{CALLERS} caller processes per server. Held = /dev/cpu_dma_latency held at 0 us (idle CPUs poll "
        "instead of halting), in-process timings included. All rounds pooled:",
        "",
        "| path | p50, own idle states (ms) | p50, held (ms) | change (ms) | p99, own (ms) | p99, held (ms) |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "| overhead (served p50 - in-process p50) | own idle states (ms) | held at 0 us (ms) |",
        "|---|---:|---:|",
        *[f"| {b} | {own['overhead'][b]:.3f} | {held['overhead'][b]:.3f} |" for b in BACKENDS],
        f"| native / python | {ratio[SETTINGS[0]]:.2f} | {ratio[SETTINGS[1]]:.2f} |",
        "",
        f"Failures at {CALLERS} callers: "
        + "; ".join(
            f"{k}: " + ", ".join(f"{b} {n}" for b, n in v["failures"].items()) for k, v in r["pooled"].items()
        ),
        "",
        "Overhead per round (ms; each round's p50s):",
        "",
        "| round | python, own | python, held | native, own | native, held |",
        "|---|---:|---:|---:|---:|",
        *[
            f"| {i + 1} | {v[SETTINGS[0]]['python']:.3f} | {v[SETTINGS[1]]['python']:.3f} "
            f"| {v[SETTINGS[0]]['native']:.3f} | {v[SETTINGS[1]]['native']:.3f} |"
            for i, v in enumerate(r["rounds"])
        ],
        "",
    ]
    path.write_text("\n".join(lines))


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    rounds = np.arange(1, len(r["rounds"]) + 1)
    for b, color in zip(BACKENDS, ("tab:orange", "tab:blue"), strict=True):
        for setting, style in zip(SETTINGS, ("o--", "s-"), strict=True):
            left.plot(
                rounds, [v[setting][b] for v in r["rounds"]], style, color=color, label=f"{b}, {setting}"
            )
    left.set_xticks(rounds)
    left.set_xlabel("round")
    left.set_ylabel("overhead at p50 (ms)")
    left.set_title("served - in process, 1 caller")
    left.legend(fontsize=8)
    names = list(r["pooled"][SETTINGS[0]]["paths"])
    x = np.arange(len(names))
    for i, setting in enumerate(SETTINGS):
        right.bar(
            x + (i - 0.5) * 0.4, [r["pooled"][setting]["paths"][n][0] for n in names], 0.4, label=setting
        )
    right.set_xticks(x, [textwrap.fill(n, 10) for n in names], fontsize=6)
    right.set_ylabel("p50 (ms)")
    right.set_yscale("log")
    right.set_title("every path, all rounds pooled")
    right.legend(fontsize=8)
    fig.suptitle(f"CPU wake-up latency (load average {r['provenance']['load_average_1min']:.1f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--out",
        default="benchmarks/results/serving_overhead_native_cpu_latency_paired.md",
        help=".md; .json, .png beside",
    )
    p.add_argument("--rounds", type=int, default=6, help="rounds, each under both settings")
    p.add_argument(
        "--calls", type=int, default=300, help="measured calls per path, caller and setting in a round"
    )
    p.add_argument("--candidates", type=int, default=100, help="N")
    p.add_argument("--history", type=int, default=50, help="L")
    args = p.parse_args(argv)
    try:
        limit = current_limit_us()
        before = "none" if limit == NO_LIMIT_US else f"{limit} us (held by another process)"
        results = measured(
            "benchmarks/cpu_latency.py", argv, "mmrank-cpu-latency-", lambda tmp: measure(args, tmp)
        )
    except MMRankError as e:
        print(f"cpu_latency: error: {e}", file=sys.stderr)
        return 1
    results["settings"] = {
        "rounds": args.rounds,
        "calls": args.calls,
        "candidates": args.candidates,
        "history": args.history,
        "limit_before": before,
    }
    save(results, Path(args.out), write_report, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
