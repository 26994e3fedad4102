"""Throughput and peak memory of `mmrank data synth` at scale.

Each size runs in its own process (so ru_maxrss is that run's peak alone), writes into a temporary folder
that is deleted afterwards, and reports wall time, events/s and peak resident memory. The table is
printed and saved to benchmarks/results/data_synth.md with the command and the machine.

    python benchmarks/data_synth.py                       # 1 M events, 20k users, 20k items
    python benchmarks/data_synth.py --events 1000000 10000000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "data_synth.md"


@dataclass
class Run:
    events: int
    users: int
    items: int
    chunk_events: int
    wall_s: float
    events_per_s: float
    events_phase_s: float
    events_phase_per_s: float
    peak_rss_mib: float
    dataset_mib: float


def measure(events: int, users: int, items: int, chunk_events: int, seed: int) -> Run:
    """Generate one dataset in this process; the caller runs it in a fresh process per size."""
    from trainer.data.synth import SynthConfig, generate, make_items, make_users, write_events

    cfg = SynthConfig(users=users, items=items, events=events, seed=seed, chunk_events=chunk_events)
    with tempfile.TemporaryDirectory(prefix="bench-synth-") as tmp:
        start = time.perf_counter()
        generate(Path(tmp) / "ds", cfg)
        wall = time.perf_counter() - start
        size = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
        # The event stream alone, without the per-item rendering that does not grow with events.
        item_world, user_world = make_items(cfg), make_users(cfg)
        start = time.perf_counter()
        write_events(Path(tmp) / "events_only", item_world, user_world, cfg)
        phase = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return Run(
        events,
        users,
        items,
        chunk_events,
        wall,
        events / wall,
        phase,
        events / phase,
        peak_kib / 1024,
        size / 2**20,
    )


def machine() -> str:
    from common.provenance import cpu_name

    return f"nproc {len(os.sched_getaffinity(0))}, {cpu_name()}, Python {platform.python_version()}"


def table(runs: list[Run], command: str) -> str:
    lines = [
        "# `mmrank data synth` throughput",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine()}",
        "",
        "Wall time covers the whole `generate` call: item text + PNG rendering, users, events, Parquet writes.",
        "The event phase is `write_events` alone (sampling, click model, Parquet parts), measured after it.",
        "Peak RSS is `ru_maxrss` of the process that ran that size alone (Python, numpy, pyarrow included).",
        "",
        "| events | users | items | chunk_events | wall s | events/s | event phase s | event phase events/s "
        "| peak RSS MiB | dataset MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r.events:,} | {r.users:,} | {r.items:,} | {r.chunk_events:,} | {r.wall_s:.1f} | "
            f"{r.events_per_s:,.0f} | {r.events_phase_s:.1f} | {r.events_phase_per_s:,.0f} | "
            f"{r.peak_rss_mib:.0f} | {r.dataset_mib:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--events", type=int, nargs="+", default=[1_000_000], help="sizes to run, one process each"
    )
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--chunk-events", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS, help="markdown table to write")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        run = measure(args.events[0], args.users, args.items, args.chunk_events, args.seed)
        print(json.dumps(run.__dict__))
        return 0
    runs = []
    for events in args.events:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            "--events",
            str(events),
            "--users",
            str(args.users),
            "--items",
            str(args.items),
            "--chunk-events",
            str(args.chunk_events),
            "--seed",
            str(args.seed),
        ]
        done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
        runs.append(Run(**json.loads(done.stdout.strip().splitlines()[-1])))
    command = shlex.join(["python", "benchmarks/data_synth.py", *(sys.argv[1:] if argv is None else argv)])
    text = table(runs, command)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
