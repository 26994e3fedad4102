"""`mmrank train` and `mmrank evaluate`: resolve, validate, train the stages, report."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from common.atomic import write_json_atomic
from common.errors import MMRankError
from trainer.config import RunConfig, parse_sets, resolve, validate
from trainer.data.schema import Manifest, load_dataset
from trainer.evaluate import evaluate_split
from trainer.run import METRICS, load_run, read_config
from trainer.train.distributed import Dist
from trainer.train.schedules import train_stages


def train(
    data_dir: str | Path, cfg: RunConfig, out: str | Path, resume: bool = False, progress: bool | None = None
) -> dict:
    """Train `cfg` on the dataset in `data_dir` into the run folder `out`; returns metrics.json's content."""
    validate(cfg, Manifest.read(data_dir).topk_protocol)  # before the (slower) dataset checks
    ds = load_dataset(data_dir)
    dist = Dist.init()
    try:
        metrics = train_stages(ds, cfg, Path(out), resume, dist, progress)
        dist.barrier()  # every rank's last collective is done before any rank tears the group down
        return metrics
    finally:
        dist.close()


def _summary(metrics: dict) -> str:
    parts = []
    for name in ("auc", "gauc", "cold_auc", "logloss", "recall@20", "ndcg@20"):
        value = metrics.get("test", {}).get(name)
        if value is not None:
            parts.append(f"{name} {value:.4f}")
    return ", ".join(parts)


def cli(args) -> int:
    cfg = resolve(args.preset, args.config, parse_sets(args.set), args.seed, args.epochs, args.max_steps)
    metrics = train(args.data, cfg, args.out, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        tr = metrics["train"]
        print(
            f"train: {args.out}: test {_summary(metrics)}; {tr['steps']} steps, "
            f"{tr['samples_per_s']:.0f} samples/s ({tr['stopped']})"
        )
    return 0


def refuse_streaming(run_dir: str | Path) -> None:
    """A streaming run's model trained on the valid and test windows after scoring them, so evaluating it
    on them again would report in-sample numbers as if they were held out."""
    if read_config(run_dir).train.streaming:
        raise MMRankError(
            f"{run_dir}: a streaming run trains on the valid and test windows right after scoring them, so "
            "its model has seen those events and `mmrank evaluate` would report in-sample metrics. Its "
            f"held-out (prequential) metrics are 'valid' and 'test' in {Path(run_dir) / METRICS}, per "
            "window under 'stream'"
        )


def evaluate_run(run_dir: str | Path, data_dir: str | Path) -> dict:
    """Valid and test metrics of a run's best model on a dataset; written to RUN/evaluation.json.
    Streaming runs are refused (`refuse_streaming`)."""
    refuse_streaming(run_dir)
    ds = load_dataset(data_dir)
    cfg, model = load_run(run_dir, ds)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    it = cfg.model.interest
    out = {"data": str(Path(data_dir).resolve())}
    for split in ("valid", "test"):
        out[split] = evaluate_split(
            model, ds, split, it.short_len, it.long_len, cfg.train.topk, cfg.train.eval_batch_size
        )
    write_json_atomic(Path(run_dir) / "evaluation.json", out)
    return out


def cli_evaluate(args) -> int:
    metrics = evaluate_run(args.run, args.data)
    print(
        f"evaluate: {args.run} on {args.data}: test {_summary(metrics)} (written to {Path(args.run) / 'evaluation.json'})"
    )
    return 0
