"""Seconds per training epoch of the MMRec-style presets (BPR-MF, LightGCN, FREEDOM, EM3 on FREEDOM) on
MMRec-format datasets, from the trainer's own per-epoch log lines.

Each (dataset, preset) trains `--epochs` epochs in a fresh run folder; the table gives the median, minimum and maximum of
the epochs' training seconds (validation excluded), the median validation seconds (full ranking of
every valid user), the rest of the run's seconds (loading the data, building the graphs, the final
test evaluation), training throughput (train positives per second) and the 1-minute load average
before and after, since the machine may be shared. Written to OUT.md / OUT.json / OUT.png.

    python -m benchmarks.graph_epoch_time --data build/ml100k_implicit,build/mmrec_20k \
        --presets bpr,lightgcn,freedom,em3_mmrec --epochs 3 --out benchmarks/results/graph_epoch_time
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common.provenance import record
from trainer.config import resolve
from trainer.data.schema import Manifest
from trainer.run import TRAIN_LOG
from trainer.train import train


def time_preset(data: Path, preset: str, epochs: int) -> dict:
    """Train `epochs` epochs of `preset` on `data`; per-epoch seconds from the run's log."""
    cfg = resolve(preset, sets={"train.log_every": 1_000_000}, epochs=epochs)
    before = record()
    with tempfile.TemporaryDirectory(prefix="graph_epoch_time.") as tmp:
        start = time.perf_counter()
        metrics = train(data, cfg, Path(tmp) / "run", progress=False)
        wall = time.perf_counter() - start
        lines = [json.loads(x) for x in (Path(tmp) / "run" / TRAIN_LOG).read_text().splitlines()]
    valid = [x for x in lines if x["event"] == "valid"]
    train_s = np.array([x["train_s"] for x in valid])
    valid_s = np.array([x["valid_s"] for x in valid])
    return {
        "data": str(data),
        "preset": preset,
        "epochs": len(valid),
        "train_s_median": float(np.median(train_s)),
        "train_s_min": float(train_s.min()),
        "train_s_max": float(train_s.max()),
        "valid_s_median": float(np.median(valid_s)),
        "other_s": wall - float(train_s.sum() + valid_s.sum()),
        "positives_per_s": metrics["train"]["samples_per_s"],
        "load_before": before["load_average_1min"],
        "load_after": record()["load_average_1min"],
        "threads": torch.get_num_threads(),
    }


def describe(data: Path) -> str:
    c = Manifest.read(data).counts
    return f"{Path(data).name} ({c['users']:,} users, {c['items']:,} items, {c['train_positives']:,} train positives)"


def markdown(rows: list[dict], command: str, prov: dict) -> str:
    out = [
        "# Seconds per epoch of the MMRec-style presets",
        "",
        f"`{command}`",
        "",
        f"Commit {prov['commit']}; machine: {prov['machine']}; torch threads "
        f"{rows[0]['threads'] if rows else '?'}; {prov['date']}. "
        "Training seconds per epoch exclude validation (the full ranking of every valid user, its own "
        "column); other: the rest of the run (loading the data, building the graphs, the final test "
        "evaluation). The machine may be "
        "shared: the 1-minute load average before and after each row is part of the row.",
        "",
        "| data | preset | epochs | train s/epoch (median) | min - max | valid s | other s | train positives/s | load before / after |",
        "|---|---|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['description']} | {r['preset']} | {r['epochs']} | {r['train_s_median']:.2f} | "
            f"{r['train_s_min']:.2f} - {r['train_s_max']:.2f} | {r['valid_s_median']:.2f} | {r['other_s']:.1f} | "
            f"{r['positives_per_s']:,.0f} | {r['load_before']:.2f} / {r['load_after']:.2f} |"
        )
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["description"] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.5), squeeze=False)
    for ax, name in zip(axes[0], datasets, strict=True):
        part = [r for r in rows if r["description"] == name]
        ax.bar([r["preset"] for r in part], [r["train_s_median"] for r in part])
        ax.set_title(name, fontsize=8)
        ax.set_ylabel("train seconds per epoch (median)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--data", required=True, help="comma-separated MMRec-format dataset folders")
    parser.add_argument("--presets", default="bpr,lightgcn,freedom,em3_mmrec")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True, help="OUT.md, OUT.json and OUT.png are written")
    args = parser.parse_args(argv)
    rows = []
    for data in [Path(d) for d in args.data.split(",") if d]:
        for preset in [p for p in args.presets.split(",") if p]:
            row = time_preset(data, preset, args.epochs)
            row["description"] = describe(data)
            print(
                f"graph_epoch_time: {row['description']} {preset}: {row['train_s_median']:.2f} s/epoch "
                f"(load {row['load_before']:.2f} -> {row['load_after']:.2f})",
                file=sys.stderr,
            )
            rows.append(row)
    command = "python -m benchmarks.graph_epoch_time " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    prov = record()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(markdown(rows, command, prov))
    args.out.with_suffix(".json").write_text(
        json.dumps({"command": command, "provenance": prov, "rows": rows}, indent=2)
    )
    plot(rows, args.out.with_suffix(".png"))
    print(
        f"graph_epoch_time: wrote {args.out.with_suffix('.md')} (threads {os.environ.get('OMP_NUM_THREADS', 'default')})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
