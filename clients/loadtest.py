"""`mmrank loadtest`: a headless locust run against `rank`, stepping the number of callers.

Steps: check the address is loopback and `rank` ready -> draw requests from the dataset
(clients/request_sample.py) -> run clients/locustfile.py in a locust subprocess (gevent patches the
process it runs in, so it gets its own) with a step ramp of user counts, each held `duration_s` ->
summarise every call per step. The subprocess is killed if it outlives the ramp by `grace_s`, so the
run is bounded in time whatever happens. OUT receives:

    requests.npz                the requests sent          calls.csv        every call (step, latency, outcome)
    locust_*.csv, locust.html   locust's own reports        locust.log       locust's output
    summary.json, summary.md    per step: users, requests, failures, p50/p95/p99 (exact, nearest rank),
                                requests/s and candidates/s
    latency_throughput.png      p50/p95/p99 against requests/s, one point per step

Percentiles are over the calls that started in the step, failed calls included (a timeout is a latency
too); throughput counts successful calls only. Locust applies a step's user count at its shape's next
tick (once a second), so a step's first calls may still run at the previous count: those "ramp" calls
are counted apart (their failures too) and the step's numbers hold only calls made at its own count,
its throughput over the time from the first of them to the end of the step.

The run writes into a hidden sibling folder of OUT and moves the files into OUT only once locust has
finished and the summary is made, so a run that fails leaves an earlier run's reports in OUT whole.
"""

from __future__ import annotations

import csv
import ipaddress
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from clients.request_sample import RequestSample, SampleConfig, draw_requests
from common.errors import MMRankError

LOCUSTFILE = Path(__file__).resolve().with_name("locustfile.py")
PERCENTILES = (50, 95, 99)
MIN_STEP_S = 2.0  # locust's shape ticks once a second; a shorter step may never run at its user count


@dataclass(frozen=True)
class LoadTestConfig:
    url: str = "127.0.0.1:8001"  # Triton address, gRPC (host:port) or HTTP (http://host:port); loopback only
    user_steps: tuple[int, ...] = (1, 2, 4, 8)  # concurrent simulated users, one step each
    duration_s: float = 20.0  # seconds each step lasts
    sample: SampleConfig = field(default_factory=SampleConfig)  # N, L, how many requests, seed
    timeout_s: float = 5.0  # per call; a slower call is a failure
    model: str = "rank"
    grace_s: float = 60.0  # locust start-up and shutdown allowance before the run is killed


def parse_user_steps(text: str, option: str = "--users") -> tuple[int, ...]:
    """ "1,2,4,8" -> (1, 2, 4, 8), else MMRankError naming the option."""
    try:
        steps = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        steps = ()
    if not steps or min(steps) < 1:
        raise MMRankError(f"{option} {text!r}: expected comma-separated user counts >= 1, e.g. 1,2,4,8")
    return steps


def protocol(url: str) -> str:
    """The protocol the ranking client speaks to `url`: "gRPC" or "HTTP"."""
    from clients.ranking_client import endpoint

    return "HTTP" if endpoint(url).protocol == "http" else "gRPC"


def _host_port(url: str, option: str) -> tuple[str, str]:
    from clients.ranking_client import RankingError, endpoint

    try:
        ep = endpoint(url)
    except RankingError as e:
        raise MMRankError(f"{option}: {e}") from None
    if ep.protocol == "http":
        return ep.host, str(ep.port)
    host, sep, port = ep.target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise MMRankError(f"{option} {url!r}: expected HOST:PORT, grpc://HOST:PORT or http://HOST:PORT")
    return host.strip("[]"), port


def check_loopback(url: str, option: str = "--url") -> tuple[str, int]:
    """HOST:PORT (or grpc://HOST:PORT, http://HOST:PORT[/path]) whose host resolves only to loopback
    addresses, else MMRankError naming it."""
    host, port = _host_port(url, option)
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, int(port), proto=socket.IPPROTO_TCP)}
    except socket.gaierror as e:
        raise MMRankError(f"{option} {url!r}: cannot resolve {host!r} ({e})") from e
    outside = sorted(a for a in addresses if not ipaddress.ip_address(a).is_loopback)
    if outside:
        raise MMRankError(
            f"{option} {url!r}: {outside[0]} is not a loopback address; load tests run on loopback only"
        )
    return host, int(port)


def check_ready(url: str, model: str) -> None:
    from clients.ranking_client import ClientConfig, RankingClient

    with RankingClient(ClientConfig(url=url, model=model, timeout_s=5.0, retries=0)) as client:
        if not client.ready():
            raise MMRankError(f"no ready model {model!r} at {url} (is `mmrank serve` running?)")


def percentiles(latency_ms: np.ndarray) -> dict[str, float]:
    """Exact nearest-rank percentiles: each one is a latency some call actually had."""
    if latency_ms.size == 0:
        return {f"p{q}_ms": float("nan") for q in PERCENTILES}
    values = np.percentile(latency_ms, PERCENTILES, method="inverted_cdf")
    return {f"p{q}_ms": float(v) for q, v in zip(PERCENTILES, values, strict=True)}


def read_calls(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols = {"step": int, "users": int, "start_s": float, "latency_ms": float, "ok": int, "candidates": int}
    return {name: np.array([kind(r[name]) for r in rows], dtype=kind) for name, kind in cols.items()} | {
        "error": np.array([r["error"] for r in rows], dtype=object)
    }


def summarise(calls: dict[str, np.ndarray], cfg: LoadTestConfig) -> list[dict]:
    steps = []
    for index, users in enumerate(cfg.user_steps):
        here = calls["step"] == index
        steady = here & (calls["users"] == users)
        ramp = here & ~steady
        if not steady.any():
            raise MMRankError(
                f"step {index} ({users} users): no call ran at that user count within {cfg.duration_s:g} s"
            )
        ok = steady & (calls["ok"] == 1)
        window_s = (index + 1) * cfg.duration_s - calls["start_s"][steady].min()
        steps.append(
            {
                "step": index,
                "users": users,
                "requests": int(steady.sum()),
                "failures": int(steady.sum() - ok.sum()),
                **percentiles(calls["latency_ms"][steady]),
                "requests_per_s": float(ok.sum() / window_s),
                "candidates_per_s": float(calls["candidates"][ok].sum() / window_s),
                "window_s": float(window_s),
                "ramp_calls": int(ramp.sum()),
                "ramp_failures": int((ramp & (calls["ok"] == 0)).sum()),
            }
        )
    return steps


def failures(summary: dict) -> int:
    """Every failed call of the run, ramp calls included."""
    return sum(s["failures"] + s["ramp_failures"] for s in summary["steps"])


def command_line(out: Path, data: Path, cfg: LoadTestConfig) -> list[str]:
    """The `mmrank loadtest` command that runs `cfg` (recorded with the results)."""
    s = cfg.sample
    return (
        f"mmrank loadtest --url {cfg.url} --out {out} --data {data} --users {','.join(map(str, cfg.user_steps))} "
        f"--duration {cfg.duration_s:g} --candidates {s.candidates} --history {s.history} "
        f"--requests {s.requests} --seed {s.seed} --timeout {cfg.timeout_s:g}"
    ).split()


def table(steps: list[dict]) -> str:
    lines = [
        "| users | requests | failures | p50 ms | p95 ms | p99 ms | requests/s | candidates/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in steps:
        lines.append(
            f"| {s['users']} | {s['requests']} | {s['failures']} | {s['p50_ms']:.2f} | {s['p95_ms']:.2f} "
            f"| {s['p99_ms']:.2f} | {s['requests_per_s']:.1f} | {s['candidates_per_s']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def markdown(summary: dict) -> str:
    p, s = summary["provenance"], summary["config"]["sample"]
    ramp = sum(step["ramp_calls"] for step in summary["steps"])
    ramp_failed = sum(step["ramp_failures"] for step in summary["steps"])
    return "\n".join(
        [
            f"# Load test of `{summary['config']['model']}` (locust over {protocol(summary['config']['url'])})",
            "",
            f"Command: `{p['command']}`  ",
            f"Commit: {p['commit']}  ",
            f"Machine: {p['machine']}, {p['platform']}  ",
            f"Date: {p['date']}; 1-minute load average before / after: {p['load_average_1min']:.2f} / "
            f"{summary['load_average_after']:.2f}  ",
            f"Requests: {summary['requests_drawn']} test requests of `{summary['data']}` in turn, "
            f"N={s['candidates']} candidates, L={s['history']} history items; each step "
            f"{summary['config']['duration_s']:g} s; percentiles exact (nearest rank) over the calls started "
            "in the step at its user count, failed calls included; throughput counts successful calls. "
            f"Calls made while locust was still reaching a step's user count: {ramp} ({ramp_failed} failed), "
            "left out of the steps' numbers.",
            "",
            table(summary["steps"]),
        ]
    )


def plot(steps: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = [s["requests_per_s"] for s in steps]
    for q in PERCENTILES:
        ax.plot(x, [s[f"p{q}_ms"] for s in steps], marker="o", label=f"p{q}")
    for s in steps:
        ax.annotate(
            f"{s['users']}u", (s["requests_per_s"], s["p99_ms"]), textcoords="offset points", xytext=(4, 4)
        )
    ax.set_xlabel("throughput (successful requests/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def locust_command(cfg: LoadTestConfig, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--only-summary",
        "--host",
        cfg.url,
        "--requests-file",
        str(out / "requests.npz"),
        "--user-steps",
        ",".join(map(str, cfg.user_steps)),
        "--step-seconds",
        str(cfg.duration_s),
        "--calls-file",
        str(out / "calls.csv"),
        "--call-timeout",
        str(cfg.timeout_s),
        "--model",
        cfg.model,
        # In-flight calls finish (and are reported) when the ramp ends, instead of being cut off.
        "--stop-timeout",
        f"{math.ceil(cfg.timeout_s)}s",
        "--csv",
        str(out / "locust"),
        "--html",
        str(out / "locust.html"),
    ]


def run_locust(cfg: LoadTestConfig, out: Path) -> None:
    """Locust writing into `out`; exit code 1 means some calls failed, which the summary reports."""
    limit = len(cfg.user_steps) * cfg.duration_s + cfg.timeout_s + cfg.grace_s
    log_path = out / "locust.log"
    with open(log_path, "wb") as log:
        try:
            done = subprocess.run(
                locust_command(cfg, out), stdout=log, stderr=subprocess.STDOUT, timeout=limit, check=False
            )
        except subprocess.TimeoutExpired as e:
            raise MMRankError(f"locust did not stop within {limit:.0f} s; see {log_path}") from e
    if done.returncode not in (0, 1) or not (out / "calls.csv").is_file():
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise MMRankError(f"locust exited {done.returncode} without its calls ({tail[0]}); see {log_path}")


def staging_folder(out: Path) -> Path:
    """An empty hidden sibling of `out` where the run writes until it has succeeded."""
    if out.exists() and not out.is_dir():
        raise MMRankError(f"--out {out}: exists and is not a folder")
    stage = out.parent / f".{out.name}.partial"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    return stage


def publish(stage: Path, out: Path) -> None:
    """Move every file of the finished run into `out`, replacing an earlier run's files of that name."""
    out.mkdir(parents=True, exist_ok=True)
    for path in stage.iterdir():
        os.replace(path, out / path.name)
    stage.rmdir()


def run_loadtest(
    out: str | Path,
    data: str | Path,
    cfg: LoadTestConfig = LoadTestConfig(),
    sample: RequestSample | None = None,
) -> dict:
    """Locust against `cfg.url` with requests drawn from the dataset `data`, or `sample` where given
    (then `data` only names where it came from in the report)."""
    check_loopback(cfg.url)
    if not cfg.user_steps or min(cfg.user_steps) < 1 or cfg.duration_s < MIN_STEP_S:
        raise MMRankError(
            f"need user steps >= 1 and a duration >= {MIN_STEP_S:g} s (locust sets a step's users at a "
            f"once-a-second tick), got {cfg.user_steps}, {cfg.duration_s:g}"
        )
    check_ready(cfg.url, cfg.model)
    out, data = Path(out), Path(data)
    stage = staging_folder(out)
    # A given sample comes from the calling script, whose own command line reproduces the run.
    from common.provenance import record

    started = record(command_line(out, data, cfg) if sample is None else ["python", *sys.argv])
    sample = sample or draw_requests(data, cfg.sample)
    sample.save(stage / "requests.npz")
    run_locust(cfg, stage)
    calls = read_calls(stage / "calls.csv")
    steps = summarise(calls, cfg)
    errors = sorted(set(calls["error"][calls["ok"] == 0]))
    summary = {
        "provenance": started,
        "load_average_after": os.getloadavg()[0],
        "config": asdict(cfg),
        "data": str(data),
        "requests_drawn": len(sample),
        "steps": steps,
        "errors": errors[:10],
    }
    (stage / "summary.json").write_text(json.dumps(summary, indent=2))
    (stage / "summary.md").write_text(markdown(summary))
    n, length = cfg.sample.candidates, cfg.sample.history
    plot(steps, stage / "latency_throughput.png", f"{cfg.model} over {protocol(cfg.url)}, N={n}, L={length}")
    publish(stage, out)
    return summary


def cli(args) -> int:
    steps = parse_user_steps(args.users)
    sample = SampleConfig(
        candidates=args.candidates, history=args.history, requests=args.requests, seed=args.seed
    )
    cfg = LoadTestConfig(
        url=args.url, user_steps=steps, duration_s=args.duration, sample=sample, timeout_s=args.timeout
    )
    summary = run_loadtest(args.out, args.data, cfg)
    print(markdown(summary), end="")
    failed = failures(summary)
    if failed:
        raise MMRankError(f"{failed} calls failed (first: {summary['errors'][0]}); reports in {args.out}")
    print(f"loadtest: reports in {args.out} (summary.json, locust.html, latency_throughput.png)")
    return 0
