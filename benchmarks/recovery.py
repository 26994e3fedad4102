"""The `item_lookup` backend process killed under load: how long `rank` is down, what readiness says
meanwhile, how many calls fail, and the latency before and after.

    python benchmarks/recovery.py [--kills 5] [--callers 4] [--settle-s 10] [--out benchmarks/results]

Repository: the one of benchmarks/serving_overhead.py (the `em3` preset's model with random weights,
L=50, python backend, `mmrank repo` defaults), served by the real tritonserver in explicit control
mode, so the launcher's supervisor reloads a model whose backend process dies
(export/backend_supervisor.py). `--callers` threads call `rank` back to back over gRPC, one user with
N=100 candidates and an L=50 history each call (clients/availability.py; a failed call is retried after
20 ms, as a client would); a prober reads `/v2/models/rank/ready` and `/v2/health/ready` back to back.
Each round: `--settle-s` of load, SIGKILL of the item_lookup stub (what the OOM killer or a crash in a
native library does), the reload, `--settle-s` of load again. Per kill, from the kill:

- noticed: the supervisor finds the stub dead; unloaded: its unload of item_lookup returned;
- not ready by: the first probe that answered "not ready" for `rank` came back (the probes' spacing
  bounds the error);
- first good answer: the first successful call started after the kill came back;
- ready again: the supervisor's load of item_lookup returned (`rank` is loaded with it);
- failed calls, and of those, how many reached the dead stub ("not healthy": each waits the backend's
  1 s before failing) rather than a model already unloaded (refused at once);
- p50/p99 of the successful calls of the settle window before the kill and after the reload.

Writes recovery.md, recovery.json (the numbers above per kill) and recovery.png (each call's latency
against the time since its kill, around the kill) into --out. The machine's load averages at start and end are recorded with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.export_latency import NUM_ITEMS, machine  # noqa: E402
from benchmarks.serving_overhead import build, request, request_tensors  # noqa: E402
from clients.availability import Call, Callers, ReadinessProber  # noqa: E402
from common.provenance import record  # noqa: E402
from export.backend_supervisor import Recovery, backend_processes  # noqa: E402
from export.repository import RenderConfig  # noqa: E402
from export.triton_launcher import TritonConfig, TritonServer  # noqa: E402

MODEL, ENSEMBLE = "item_lookup", "rank"
CANDIDATES, HISTORY = 100, 50
DEADLINE_S = 300.0
NOT_HEALTHY = "is not healthy"
PLOT_MARGIN_S = 2.0  # the plot shows the calls this long before each kill and after its reload


def _wait(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"recovery benchmark: no {what} within {DEADLINE_S:.0f} s")
        time.sleep(0.05)


def _percentiles(calls: list[Call]) -> tuple[float, float]:
    ms = [c.ms for c in calls if c.output is not None]
    return (float(np.percentile(ms, 50)), float(np.percentile(ms, 99))) if ms else (float("nan"),) * 2


def one_kill(server: TritonServer, load: Callers, prober: ReadinessProber, settle_s: float) -> dict:
    """Settle, kill the item_lookup stub, wait for the reload and settle again; the kill's numbers."""
    before_from = time.monotonic()
    time.sleep(settle_s)
    stub = next(p for p in backend_processes(server.process.pid, server.shm_prefix) if p.model == MODEL)
    done = len(server.supervisor.recoveries)
    killed = time.monotonic()
    os.kill(stub.pid, signal.SIGKILL)
    _wait(lambda: len(server.supervisor.recoveries) > done, "death noticed")
    recovery: Recovery = server.supervisor.recoveries[done]
    _wait(lambda: recovery.ready is not None, "reload")
    _wait(lambda: load.good_after(recovery.ready) > 0, "answer after the reload")
    time.sleep(settle_s)
    until = time.monotonic()
    calls = [c for c in list(load.calls) if before_from <= c.start < until]
    probes = [p for p in list(prober.probes) if killed < p.start < until]
    failed = [c for c in calls if c.output is None]
    first_down = next((p for p in probes if p.model_ready is False), None)
    first_good = min((c.end for c in calls if c.output is not None and c.start > killed), default=None)

    def since(t: float | None) -> float | None:
        return None if t is None else round(t - killed, 4)

    return {
        "noticed_s": since(recovery.detected),
        "unloaded_s": since(recovery.unloaded),
        "not_ready_by_s": since(first_down.end if first_down else None),
        "server_not_ready_by_s": since(next((p.end for p in probes if p.server_ready is False), None)),
        "first_good_answer_s": since(first_good),
        "ready_again_s": since(recovery.ready),
        "calls": len(calls),
        "failed_calls": len(failed),
        "failed_not_healthy": sum(NOT_HEALTHY in c.error for c in failed),
        "failed_by_status": dict(Counter(c.status for c in failed)),
        "failure_messages": sorted({c.error for c in failed}),
        "failed_outside_the_gap": sum(not (killed <= c.end and c.start <= recovery.ready) for c in failed),
        "ready_probes_in_the_gap": sum(
            p.model_ready is True
            for p in probes
            if first_down and first_down.start <= p.start and p.end < recovery.ready
        ),
        "p50_p99_before_ms": _percentiles([c for c in calls if c.end < killed]),
        "p50_p99_after_ms": _percentiles([c for c in calls if c.start > recovery.ready]),
        "reload_attempts": recovery.attempts,
        "timeline": [(round(c.start - killed, 4), round(c.ms, 2), c.output is not None) for c in calls],
        "down": [since(first_down.start if first_down else None), since(recovery.ready)],
    }


def run(args) -> dict:
    loads = [os.getloadavg()]
    provenance = record(args.command)
    hist, cands = request(CANDIDATES, HISTORY, NUM_ITEMS)

    def rank_request() -> list:
        import tritonclient.grpc as grpc

        return request_tensors(grpc, hist, cands)

    with tempfile.TemporaryDirectory(prefix="mmrank-recovery-") as tmp:
        build(Path(tmp), HISTORY, RenderConfig(backend="python"))
        with (
            TritonServer(TritonConfig(Path(tmp) / "repo", control_mode="explicit")) as server,
            ReadinessProber(server.http_url, ENSEMBLE) as prober,
            Callers(server.grpc_url, ENSEMBLE, rank_request, "scores", args.callers) as load,
        ):
            _wait(lambda: load.good_after(0) >= args.callers, "first answers")
            kills = []
            for k in range(args.kills):
                kills.append(one_kill(server, load, prober, args.settle_s))
                print(f"kill {k + 1}/{args.kills}: {_row(k + 1, kills[-1])}", flush=True)
    loads.append(os.getloadavg())
    return {
        **provenance,
        "machine": machine(),
        "load_averages_start_end": [[round(v, 2) for v in load] for load in loads],
        "callers": args.callers,
        "settle_s": args.settle_s,
        "candidates": CANDIDATES,
        "history": HISTORY,
        "kills": kills,
    }


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _row(k: int, r: dict) -> str:
    b50, b99 = r["p50_p99_before_ms"]
    a50, a99 = r["p50_p99_after_ms"]
    times = " | ".join(
        _fmt(r[key])
        for key in (
            "noticed_s",
            "not_ready_by_s",
            "server_not_ready_by_s",
            "ready_again_s",
            "first_good_answer_s",
        )
    )
    return (
        f"| {k} | {times} | {r['failed_calls']} of {r['calls']} | {r['failed_not_healthy']} "
        f"| {r['failed_outside_the_gap']} | {b50:.1f} / {b99:.1f} | {a50:.1f} / {a99:.1f} |"
    )


def write(report: dict, out: Path) -> None:
    kills = report["kills"]

    def median(key: str) -> str:
        values = [k[key] for k in kills if k[key] is not None]
        return f"{np.median(values):.2f} (max {max(values):.2f})" if values else "-"

    (start, end) = report["load_averages_start_end"]
    statuses = Counter()
    for k in kills:
        statuses.update(k["failed_by_status"])
    messages = sorted({m for k in kills for m in k["failure_messages"]})
    lines = [
        "# A backend process killed under load: recovery of `rank`",
        "",
        f"Command: `{report['command']}`  ",
        f"Commit: {report['commit']}  ",
        f"Machine: {report['machine']}; {report['platform']}  ",
        f"Date: {report['date']}; load averages (1, 5, 15 min) at start {start}, at end {end}: the machine "
        "was shared with other work, so the times include its noise.",
        "",
        f"{report['callers']} callers call `rank` back to back over gRPC ({report['candidates']} candidates, an "
        f"L={report['history']} history); each of {len(kills)} rounds settles {report['settle_s']:g} s, SIGKILLs "
        "the `item_lookup` stub, waits for the launcher's supervisor to reload it and settles again "
        "(benchmarks/recovery.py). Seconds from the kill:",
        "",
        "| kill | supervisor noticed | `rank` not ready by | server not ready by | ready again | first good answer "
        "| failed calls | of them at the dead stub | failed outside the gap | p50 / p99 before (ms) "
        "| p50 / p99 after (ms) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
        *[_row(k, r) for k, r in enumerate(kills, 1)],
        "",
        f"Median (max) over the kills: noticed {median('noticed_s')} s, `rank` not ready by "
        f"{median('not_ready_by_s')} s, ready again {median('ready_again_s')} s, first good answer "
        f"{median('first_good_answer_s')} s after the kill. Probes that answered ready while `rank` was down: "
        f"{sum(k['ready_probes_in_the_gap'] for k in kills)}; reloads that needed more than one load: "
        f"{sum(k['reload_attempts'] > 1 for k in kills)}.",
        "",
        "Failed calls by gRPC status over all kills: "
        + ", ".join(f"{status} {n}" for status, n in sorted(statuses.items()))
        + "; their messages: "
        + "; ".join(f"`{m}`" for m in messages)
        + ".",
        "",
        "Failed calls are counted as the callers make them (a refused call is retried after 20 ms), so their "
        "number says more about the callers than about the server; the calls at the dead stub are those sent "
        "before the supervisor unloaded the model (each waits the backend's 1 s before failing).",
        "",
        "![latency of each call against the time since its kill](recovery.png)",
        "",
    ]
    (out / "recovery.md").write_text("\n".join(lines))
    summary = [{key: value for key, value in k.items() if key != "timeline"} for k in kills]
    (out / "recovery.json").write_text(json.dumps({**report, "kills": summary}, indent=1) + "\n")
    plot(kills, out / "recovery.png")


def plot(kills: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for k, r in enumerate(kills, 1):
        t, ms, ok = (np.array(v) for v in zip(*r["timeline"], strict=True))
        shown = (t > -PLOT_MARGIN_S) & (t < r["down"][1] + PLOT_MARGIN_S)
        t, ms, ok = t[shown], ms[shown], ok[shown]
        ax.scatter(t[ok], ms[ok], s=4, color=f"C{k % 10}", label=f"kill {k}: answered")
        ax.scatter(t[~ok], ms[~ok], s=10, marker="x", color=f"C{k % 10}", label=f"kill {k}: failed")
        down_from, down_to = r["down"]
        if down_from is not None:
            ax.axvspan(down_from, down_to, color=f"C{k % 10}", alpha=0.08)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlim(-PLOT_MARGIN_S, max(r["down"][1] for r in kills) + PLOT_MARGIN_S)
    ax.set_yscale("log")
    ax.set_xlabel("call start, seconds since the kill (shaded: rank not ready; x: failed call)")
    ax.set_ylabel("call latency (ms)")
    ax.set_title("rank under load, item_lookup backend process SIGKILLed at 0")
    ax.legend(fontsize=7, markerscale=3, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=5, help="rounds of settle, kill, reload")
    p.add_argument("--callers", type=int, default=4, help="threads calling rank back to back")
    p.add_argument("--settle-s", type=float, default=10.0, help="load before each kill and after each reload")
    p.add_argument("--out", default="benchmarks/results", help="folder for recovery.{md,json,png}")
    args = p.parse_args(argv)
    args.command = ["python", "benchmarks/recovery.py", *(sys.argv[1:] if argv is None else argv)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write(run(args), out)
    print((out / "recovery.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
