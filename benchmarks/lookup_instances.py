"""`rank` on the native onnxruntime backend with 1 and more instances (`--lookup-instances`): what
instances buy at 1 and at 8 concurrent callers on this machine.

    python benchmarks/lookup_instances.py [--instances 1,2] [--rounds 5] [--calls 300]
        [--out benchmarks/results/lookup_instances_native.md]   # + .json and .png beside it

The em3 ranking graph (L=50, random weights on the ML-100K-sized schema, as
benchmarks/serving_overhead.py) is exported once and rendered with `mmrank repo --backend onnxruntime
--lookup-instances K` for each K. All servers run at once and each round measures every server in turn,
so a shared CPU's drift spreads over all of them: 1 caller (sync tritonclient, `calls` calls), then 8
caller processes (a client each, `calls` calls each). Requests per second at 8 callers are 8 / the
mean latency (a closed loop: each caller sends its next request when the last one is answered).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.export_latency import timed  # noqa: E402
from benchmarks.serving_overhead import (  # noqa: E402
    NUM_ITEMS,
    caller_processes,
    export_em3,
    measured,
    percentiles,
    request,
    request_tensors,
    save,
)
from export.repository import RenderConfig, render_repository  # noqa: E402
from export.triton_launcher import TritonConfig, TritonServer  # noqa: E402

CALLERS = 8


def one_round(server: TritonServer, hist: np.ndarray, cands: np.ndarray, calls: int) -> dict:
    """1 caller, then CALLERS caller processes, against `server`'s `rank`."""
    import tritonclient.grpc as grpc

    client = grpc.InferenceServerClient(server.grpc_url)
    inputs = request_tensors(grpc, hist, cands)
    one = timed(lambda: client.infer("rank", inputs), calls, warmup=20)
    client.close()
    many, failures = caller_processes(server.grpc_url, hist, cands, calls, CALLERS)
    return {"one": one, "eight": many, "failures": failures}


def summary(ms: list[float]) -> dict[str, float]:
    p50, p99 = percentiles(ms)
    return {"p50": p50, "p99": p99, "mean": float(np.mean(ms))}


def measure(args, tmp: Path) -> dict:
    export = export_em3(tmp, args.history)
    hist, cands = request(args.candidates, args.history, NUM_ITEMS)
    repos = {}
    for k in args.instances:
        repos[k] = tmp / f"instances{k}"
        render_repository(export, repos[k], RenderConfig(backend="onnxruntime", lookup_instances=k))
    servers = {
        k: TritonServer(TritonConfig(repo, control_mode="explicit")).start() for k, repo in repos.items()
    }
    rounds: list[dict] = []
    try:
        for r in range(args.rounds):
            rounds.append({k: one_round(s, hist, cands, args.calls) for k, s in servers.items()})
            line = "; ".join(
                f"{k} instances: 8 callers p99 {np.percentile(rounds[-1][k]['eight'], 99):.3f} ms"
                for k in servers
            )
            print(f"round {r + 1}/{args.rounds}: {line}", file=sys.stderr, flush=True)
    finally:
        for server in servers.values():
            server.stop()
    out = {"rounds": [], "pooled": {}}
    for per_round in rounds:
        out["rounds"].append(
            {
                str(k): {"one": summary(v["one"]), "eight": summary(v["eight"]), "failures": v["failures"]}
                for k, v in per_round.items()
            }
        )
    for k in args.instances:
        out["pooled"][str(k)] = {
            "one": summary([t for r in rounds for t in r[k]["one"]]),
            "eight": summary([t for r in rounds for t in r[k]["eight"]]),
            "failures": sum(r[k]["failures"] for r in rounds),
        }
    return out


def write_report(r: dict, path: Path) -> None:
    prov, s = r["provenance"], r["settings"]
    header = (
        "| instances | 1 caller p50 (ms) | 1 caller p99 (ms) | 8 callers p50 (ms) | 8 callers p99 (ms) | "
    )
    header += "8 callers requests/s | failures |"
    rule = "|---|---:|---:|---:|---:|---:|---:|"

    def row(label: str, v: dict) -> str:
        one, eight = v["one"], v["eight"]
        return (
            f"| {label} | {one['p50']:.3f} | {one['p99']:.3f} | {eight['p50']:.3f} | {eight['p99']:.3f} | "
            f"{CALLERS / eight['mean'] * 1e3:.0f} | {v['failures']} |"
        )

    lines = [
        "# Native `rank`: instances at 1 and 8 callers",
        "",
        f"Command: `{prov['command']}`  ",
        f"Commit: {prov['commit']}  ",
        f"Machine: {prov['machine']}  ",
        f"Date: {prov['date']}; 1-minute load average before / after: {prov['load_average_1min']:.2f} / "
        f"{prov['load_average_1min_after']:.2f} (a shared CPU inflates every number, p99 most)",
        "",
        f"em3 ranking graph (L={s['history']}), N={s['candidates']} candidates, one user per request; `mmrank "
        "repo --backend onnxruntime` defaults (the lookup merged into the ranking graph, 1 onnxruntime thread "
        f"per instance) but for `--lookup-instances`. All servers up at once; {s['rounds']} rounds, each "
        f"measuring every server in turn: {s['calls']} calls from 1 caller, then {s['calls']} calls from each "
        f"of {CALLERS} caller processes. Requests/s at {CALLERS} callers = {CALLERS} / mean latency.",
        "",
        "All rounds pooled:",
        "",
        header,
        rule,
        *[row(k, v) for k, v in r["pooled"].items()],
        "",
        "Each round:",
        "",
        header.replace("| instances |", "| round: instances |"),
        rule,
        *[row(f"{i + 1}: {k}", v) for i, rnd in enumerate(r["rounds"]) for k, v in rnd.items()],
        "",
    ]
    path.write_text("\n".join(lines))


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    rounds = np.arange(1, len(r["rounds"]) + 1)
    for k in r["pooled"]:
        ax.plot(rounds, [rnd[k]["eight"]["p99"] for rnd in r["rounds"]], "o-", label=f"{k} instances, p99")
        ax.plot(rounds, [rnd[k]["eight"]["p50"] for rnd in r["rounds"]], "s--", label=f"{k} instances, p50")
    ax.set_xticks(rounds)
    ax.set_xlabel("round")
    ax.set_ylabel("ms")
    ax.set_title(
        f"native rank, {CALLERS} caller processes (load average {r['provenance']['load_average_1min']:.1f})"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected instance counts such as 1,2") from None
    if not counts or min(counts) < 1 or len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected distinct counts of at least 1")
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--out", default="benchmarks/results/lookup_instances_native.md", help=".md; .json, .png beside"
    )
    p.add_argument(
        "--instances",
        type=_counts,
        default=[1, 2],
        help="instance counts of the native `rank`, one server each",
    )
    p.add_argument("--rounds", type=int, default=5, help="rounds over all servers")
    p.add_argument("--calls", type=int, default=300, help="measured calls per caller and round")
    p.add_argument("--candidates", type=int, default=100, help="N")
    p.add_argument("--history", type=int, default=50, help="L")
    args = p.parse_args(argv)
    results = measured(
        "benchmarks/lookup_instances.py", argv, "mmrank-instances-", lambda tmp: measure(args, tmp)
    )
    results["settings"] = {
        "instances": args.instances,
        "rounds": args.rounds,
        "calls": args.calls,
        "candidates": args.candidates,
        "history": args.history,
    }
    save(results, Path(args.out), write_report, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
