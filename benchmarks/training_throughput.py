"""LEMUR's memory bank: training throughput and quality with the bank vs re-encoding every history item.

For each history length L, trains `lemur` (bank: history vectors are read from the bank, only a sampled
share of targets runs the text encoder) and `lemur_no_bank` (the same model, every distinct history and
target item encoded in every step) with `model.interest.long_len = L`, one run each, the same data,
seed and epochs. Reports training samples/s (the trainer's own measure: optimizer-step time only),
their ratio, test AUC / GAUC / cold-start AUC, and plots the bank's staleness (mean cosine between a
probed item's eval-mode vector when the bank rewrites it and its eval-mode vector at the previous write:
encoder drift without dropout noise, trainer/model/memory_bank.py StalenessProbe) and coverage (share of
history positions served a written vector) over training steps.

    python benchmarks/training_throughput.py --data DIR --out benchmarks/results [--lengths 50,200]

Writes OUT/memory_bank.md (table, command, machine), OUT/memory_bank.json and OUT/memory_bank.png;
the runs go to --runs (default runs/memory_bank). A finished run is reused, so a re-run only redoes
what is missing.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from common.atomic import write_json_atomic
from common.errors import MMRankError
from common.provenance import machine
from trainer.config import resolve
from trainer.run import METRICS
from trainer.train import train

VARIANTS = {"bank": "lemur", "re-encode": "lemur_no_bank"}
CURVES = ("bank/staleness", "bank/history_coverage", "bank/long_history_coverage", "bank/target_coverage")


def run_variant(data: Path, runs: Path, variant: str, length: int, args, seed: int | None = None) -> dict:
    seed = args.seed if seed is None else seed
    out = runs / (f"{variant}_L{length}" if seed == args.seed else f"{variant}_L{length}_seed{seed}")
    if (out / METRICS).is_file():
        print(f"reusing {out}", file=sys.stderr)
        return json.loads((out / METRICS).read_text())
    sets = {"model.interest.long_len": length, "train.log_every": args.log_every}
    cfg = resolve(VARIANTS[variant], sets=sets, seed=seed, epochs=args.epochs, max_steps=args.max_steps)
    return train(data, cfg, out)


def bank_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    curves: dict[str, list[tuple[int, float]]] = {name: [] for name in CURVES}
    for line in (run_dir / "train_log.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("event") != "train":
            continue
        for name in CURVES:
            value = row.get(name)
            if value is not None and np.isfinite(value):
                curves[name].append((int(row["step"]), float(value)))
    return curves


def plot(curves: dict[int, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for length, by_name in curves.items():
        steps, values = (
            zip(*by_name["bank/staleness"], strict=True) if by_name["bank/staleness"] else ((), ())
        )
        left.plot(steps, values, label=f"L={length}")
        for name, style in (("bank/history_coverage", "-"), ("bank/long_history_coverage", "--")):
            if by_name[name]:
                s, v = zip(*by_name[name], strict=True)
                right.plot(s, v, style, label=f"{name.split('/')[1]}, L={length}")
    left.set(
        title="staleness: cos(now, at previous write), eval mode",
        xlabel="training step",
        ylabel="mean cosine",
    )
    right.set(
        title="coverage: history positions with a written vector", xlabel="training step", ylabel="share"
    )
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def seed_spread(results: dict[int, dict[str, dict]], extra: dict[int, list[dict]]) -> list[str]:
    """Test AUC of the bank variant over all its seeds (mean +- std) against the re-encode run."""
    lines = ["| L | bank test AUC over seeds | re-encode test AUC | within one std |", "|---|---|---|---|"]
    for length, runs in extra.items():
        aucs = np.array([results[length]["bank"]["test"]["auc"], *(m["test"]["auc"] for m in runs)])
        mean, std = aucs.mean(), aucs.std(ddof=1)
        other = results[length]["re-encode"]["test"]["auc"]
        lines.append(
            f"| {length} | {mean:.4f} ± {std:.4f} ({len(aucs)} seeds) | {other:.4f} | "
            f"{'yes' if abs(other - mean) <= std else 'no'} |"
        )
    return lines


def table(results: dict[int, dict[str, dict]]) -> list[str]:
    lines = [
        "| L | variant | train samples/s | speed-up | test AUC | test GAUC | cold-start AUC | steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for length, by_variant in results.items():
        base = by_variant["re-encode"]["train"]["samples_per_s"]
        for variant, m in by_variant.items():
            t, tr = m["test"], m["train"]
            lines.append(
                f"| {length} | {variant} ({VARIANTS[variant]}) | {tr['samples_per_s']:.1f} | "
                f"{tr['samples_per_s'] / base:.2f}x | {t['auc']:.4f} | {t['gauc']:.4f} | "
                f"{t['cold_auc']:.4f} | {tr['steps']} |"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset folder with its feature cache")
    p.add_argument("--out", default="benchmarks/results", help="folder for memory_bank.{md,json,png}")
    p.add_argument("--runs", default="runs/memory_bank", help="folder for the training runs")
    p.add_argument("--lengths", default="50,200", help="comma-separated history lengths L")
    p.add_argument("--epochs", type=int, default=None, help="epochs of every run (default: the preset's)")
    p.add_argument("--max-steps", type=int, default=None, help="stop every run after this many steps")
    p.add_argument("--seed", type=int, default=0, help="seed of every run")
    p.add_argument(
        "--bank-seeds",
        default="",
        help="extra seeds for the bank variant only, for the std of its AUC (its runs are cheap)",
    )
    p.add_argument("--log-every", type=int, default=5, help="steps between train log rows (curve resolution)")
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    if not lengths:
        raise MMRankError("--lengths: give at least one history length")
    data, runs, out = Path(args.data), Path(args.runs), Path(args.out)
    results: dict[int, dict[str, dict]] = {}
    curves: dict[int, dict] = {}
    extra: dict[int, list[dict]] = {}
    bank_seeds = [int(x) for x in args.bank_seeds.split(",") if x.strip()]
    for length in lengths:
        results[length] = {v: run_variant(data, runs, v, length, args) for v in VARIANTS}
        curves[length] = bank_curves(runs / f"bank_L{length}")
        if bank_seeds:
            extra[length] = [run_variant(data, runs, "bank", length, args, seed) for seed in bank_seeds]
    out.mkdir(parents=True, exist_ok=True)
    plot(curves, out / "memory_bank.png")
    command = "python benchmarks/training_throughput.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    lines = [
        "# Memory bank: throughput and quality (LEMUR §3)",
        "",
        f"Command: `{command}`",
        f"Machine: {machine()}",
        f"Data: `{data}`; one run per row, seed {args.seed}; samples/s counts optimizer-step time only.",
        "",
        *table(results),
        "",
        *(seed_spread(results, extra) + [""] if extra else []),
        "Staleness and coverage of the bank runs over training: `memory_bank.png`.",
        "",
    ]
    (out / "memory_bank.md").write_text("\n".join(lines))
    write_json_atomic(
        out / "memory_bank.json",
        {"command": command, "machine": machine(), "results": results, "bank_seed_runs": extra},
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
