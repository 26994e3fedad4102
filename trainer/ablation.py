"""`mmrank ablation`: every preset x seed trained in turn, then markdown tables: mean +- std per preset,
and per claim (each later row against the first, the baseline, on each test metric both have) the
paired difference over seeds with its 95% interval, paired t-test p-value and a verdict that follows
the interval (`trainer.stats`).

OUT/runs/PRESET/seedS/ are ordinary run folders: a finished one (metrics.json) is reused and an
interrupted one resumed, so re-running the same command after a crash only does the missing work. A
run folder trained with another config than this command resolves (an unfinished one may differ in when
to stop) or on another dataset is refused, naming the difference, before anything trains.
OUT/ablation.md holds the table with the exact command and machine; OUT/ablation.json the raw metrics.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

from common.atomic import write_json_atomic
from common.errors import MMRankError
from common.provenance import machine
from trainer.config import RunConfig, parse_sets, read_preset, resolve, stop_metric, validate
from trainer.data.schema import Manifest
from trainer.run import CONFIG, METRICS, data_identity, data_mismatch, read_config
from trainer.stats import describe, paired
from trainer.train import train
from trainer.train.run_dir import RESUMABLE_CHANGES, _differences

# (metrics.json block, key, column title, decimals); a column no run has is left out
COLUMNS = (
    ("test", "auc", "test AUC", 4),
    ("test", "gauc", "test GAUC", 4),
    ("test", "cold_auc", "cold-start AUC", 4),
    ("test", "logloss", "test logloss", 4),
    ("test", "recall@10", "test R@10", 4),
    ("test", "recall@20", "test R@20", 4),
    ("test", "ndcg@10", "test N@10", 4),
    ("test", "ndcg@20", "test N@20", 4),
    ("train", "samples_per_s", "train samples/s", 0),
    ("train", "wall_s", "s per run", 0),
)
# test metrics each row is compared on
CLAIMS = ("auc", "cold_auc", "recall@10", "recall@20", "ndcg@10", "ndcg@20")


def parse_list(text: str, kind: type, what: str) -> list:
    try:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise MMRankError(f"--{what}: expected a comma-separated list ({e})") from e
    if not values:
        raise MMRankError(f"--{what}: empty list")
    return values


def run_path(out: Path, preset: str, seed: int) -> Path:
    return out / "runs" / preset / f"seed{seed}"


def _value(tree: dict, key: str):
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def check_reusable(run_dir: Path, cfg: RunConfig, data: dict[str, str]) -> None:
    """A run folder stands in for `cfg` on the dataset `data` (`data_identity`) only if it was trained with
    both: otherwise a rerun with another --set, --epochs, --max-steps or --data would tabulate the old
    run's results (finished) or continue it (unfinished) under the new command."""
    if not (run_dir / CONFIG).is_file():
        return
    finished = (run_dir / METRICS).is_file()
    what = "a finished run" if finished else "an unfinished run"
    outcome = f"its {METRICS} would be tabulated as" if finished else "resuming it would make it"
    advice = "Choose another --out, or delete that run folder to train it again"
    saved, asked = read_config(run_dir).to_dict(), cfg.to_dict()
    diff = [k for k in _differences(saved, asked) if finished or k not in RESUMABLE_CHANGES]
    if diff:
        shown = "; ".join(f"{k}: {_value(saved, k)!r} there, {_value(asked, k)!r} now" for k in diff)
        raise MMRankError(
            f"{run_dir}: {what} trained with another config ({shown}); {outcome} this command's result. {advice}"
        )
    other = data_mismatch(run_dir, data)
    if other:
        raise MMRankError(f"{run_dir}: {what} {other}; {outcome} this command's result. {advice}")


def run_one(data: Path, cfg: RunConfig, run_dir: Path) -> dict:
    """The run's metrics: a finished run's (checked by `check_reusable`), else trained or resumed now."""
    if (run_dir / METRICS).is_file():
        return json.loads((run_dir / METRICS).read_text())
    return train(data, cfg, run_dir, resume=(run_dir / CONFIG).is_file())


def _values(runs: list[dict], block: str, key: str) -> list[float | None]:
    return [r.get(block, {}).get(key) for r in runs]


def checkpoint_steps(runs: list[dict]) -> str:
    """Per seed, the step of the kept checkpoint out of the steps trained: "228/684" says early stopping
    kept the first epoch of three, which a mean over seeds would hide."""
    return ", ".join(f"{r['train'].get('best_step', '?')}/{r['train'].get('steps', '?')}" for r in runs)


def origins(results: dict[str, list[dict]]) -> str:
    """Which code, machine and thread count made the runs tabulated, with how many runs each: reused runs
    may come from other commits or machines than the one tabulating them."""
    counts = Counter(
        (
            f"commit {p['commit']}, {p['machine']}, {p['torch_threads']} torch thread(s)"
            if (p := r.get("provenance"))
            else "not recorded (a metrics.json without provenance)"
        )
        for runs in results.values()
        for r in runs
    )
    return "; ".join(f"{what}: {n} run{'s' * (n > 1)}" for what, n in counts.most_common())


def table(results: dict[str, list[dict]]) -> list[str]:
    """Markdown rows: one per preset, mean ± std over seeds, and each seed's kept checkpoint step."""
    columns = [
        c for c in COLUMNS if any(v is not None for runs in results.values() for v in _values(runs, *c[:2]))
    ]
    head = ["preset", "paper row", *[c[2] for c in columns], "best step/steps per seed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for preset, runs in results.items():
        cells = [describe(_values(runs, block, key), d) for block, key, _, d in columns]
        cells.append(checkpoint_steps(runs))
        lines.append("| " + " | ".join([preset, read_preset(preset)["paper"], *cells]) + " |")
    return lines


def claims(results: dict[str, list[dict]]) -> list[str]:
    """Markdown rows: every later preset against the first on each claim metric, paired by seed."""
    names = list(results)
    base = results[names[0]]
    head = [
        "preset vs " + names[0],
        "test metric",
        "mean difference",
        "95% interval",
        "paired t p",
        "verdict",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for preset in names[1:]:
        for metric in CLAIMS:
            row, ref = _values(results[preset], "test", metric), _values(base, "test", metric)
            if all(v is None for v in row) or all(v is None for v in ref):
                continue
            c = paired(row, ref)
            cells = [
                preset,
                metric,
                f"{c.mean:+.4f}",
                c.interval,
                c.p_text,
                c.verdict,
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def run_ablation(
    data: str | Path,
    presets: list[str],
    seeds: list[int],
    out: str | Path,
    sets: dict,
    epochs: int | None = None,
    max_steps: int | None = None,
    command: str = "",
) -> Path:
    data, out = Path(data), Path(out)
    manifest = Manifest.read(data)
    plan = {
        (preset, seed): resolve(preset, sets=sets, seed=seed, epochs=epochs, max_steps=max_steps)
        for preset in presets
        for seed in seeds
    }
    identity = data_identity(data)
    for (preset, seed), cfg in plan.items():  # every name, override and reused run checked before training
        validate(cfg, manifest.topk_protocol)
        check_reusable(run_path(out, preset, seed), cfg, identity)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    for (preset, seed), cfg in plan.items():
        t0 = time.perf_counter()
        metrics = run_one(data, cfg, run_path(out, preset, seed))
        results.setdefault(preset, []).append(metrics)
        shown = {k: metrics["test"].get(k) for k in CLAIMS if metrics["test"].get(k) is not None}
        print(
            f"ablation: {preset} seed {seed}: test {json.dumps(shown)} ({time.perf_counter() - t0:.0f} s)",
            file=sys.stderr,
        )
    lines = [
        f"# Ablation: {', '.join(presets)}",
        "",
        f"- Command: `{command}`",
        f"- Tabulated on: {machine()}",
        f"- Runs made by: {origins(results)}",
        f"- Data: `{data}` ({manifest.name}, {manifest.counts.get('events', '?')} events)",
        f"- Seeds: {', '.join(map(str, seeds))}; overrides: {json.dumps(sets) if sets else 'none'}",
        f"- Test metrics of each run's best checkpoint (by valid "
        f"{stop_metric(resolve(presets[0], sets=sets).train.early_stop_metric, manifest.topk_protocol)}), "
        "mean ± std over seeds (std with n - 1).",
        "- Runs: `runs/PRESET/seedS/` (config.json, metrics.json); raw metrics in `ablation.json`.",
        "",
        *table(results),
        "",
        f"Each row against `{presets[0]}`, paired by seed: mean of (row - baseline), its 95% Student-t interval, "
        "the two-sided paired t-test p-value; the verdict follows the interval (a difference is claimed only "
        "when the whole interval is on one side of 0).",
        "",
        *(claims(results) if len(presets) > 1 else ["(one preset: nothing to compare)"]),
        "",
    ]
    path = out / "ablation.md"
    tmp = path.with_name(".ablation.md.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    write_json_atomic(out / "ablation.json", {"command": command, "machine": machine(), "results": results})
    return path


def command_line(args) -> str:
    """The command, rebuilt from the parsed arguments (the same whether run from a shell or from Python)."""
    argv = [
        "mmrank",
        "ablation",
        "--data",
        str(args.data),
        "--presets",
        args.presets,
        "--seeds",
        args.seeds,
        "--out",
        str(args.out),
    ]
    for item in args.set:
        argv += ["--set", item]
    for flag, value in (("--epochs", args.epochs), ("--max-steps", args.max_steps)):
        if value is not None:
            argv += [flag, str(value)]
    return shlex.join(argv)


def cli(args) -> int:
    presets = parse_list(args.presets, str, "presets")
    seeds = parse_list(args.seeds, int, "seeds")
    command = command_line(args)
    path = run_ablation(
        args.data, presets, seeds, args.out, parse_sets(args.set), args.epochs, args.max_steps, command
    )
    print(f"ablation: wrote {path}")
    return 0
