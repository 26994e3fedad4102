"""The run folder of `mmrank train`: checked against --resume, config.json and run.json written, nothing
of value overwritten."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from common.atomic import write_json_atomic
from common.errors import MMRankError
from trainer import checkpoint
from trainer.checkpoint import TrainState
from trainer.config import RunConfig
from trainer.run import CONFIG, CONTENT_TABLE, METRICS, STAGE1, data_mismatch, read_config, write_record
from trainer.train.distributed import Dist
from trainer.train.loop import trains_further

# Keys a resumed run may change: when to stop, not what to train.
RESUMABLE_CHANGES = ("train.max_steps", "train.epochs")


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _differences(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.append(f"{prefix}{k}")
    return out


def check_resume(out: Path, cfg: RunConfig, data: dict[str, str]) -> None:
    """A resume continues the same run: its config (but when to stop), its dataset, and steps left to
    train; a finished run's metrics.json is not rewritten by resuming it."""
    if not (out / CONFIG).is_file():
        raise MMRankError(f"{out}: nothing to resume (no {CONFIG})")
    saved = read_config(out)
    diff = [k for k in _differences(saved.to_dict(), cfg.to_dict()) if k not in RESUMABLE_CHANGES]
    if diff:
        raise MMRankError(
            f"{out}: the config differs from the run's {CONFIG} in {', '.join(diff[:4])}; "
            f"resume with --config {out / CONFIG}"
        )
    other = data_mismatch(out, data)
    if other:
        raise MMRankError(f"{out}: the run {other}; resume with the --data it trained on")
    last = out / checkpoint.LAST
    if (out / METRICS).is_file() and last.is_file():
        state = TrainState.from_dict(checkpoint.load(last, ("state",), mmap=True)["state"])
        if not trains_further(state, cfg.train):
            # An early stop with no LoRA phase left ends the run whatever --epochs or --max-steps say.
            if state.stopped_early and not trains_further(state, dataclasses.replace(cfg.train, max_steps=0)):
                raise MMRankError(
                    f"{out}: the run stopped early at step {state.global_step} (best step "
                    f"{state.best_step}, results in {METRICS}): its validation metric stopped improving, so "
                    "more --epochs or --max-steps would not train it further; train a new run in another "
                    "--out (e.g. with a larger train.patience)"
                )
            raise MMRankError(
                f"{out}: the run is finished (step {state.global_step}, results in {METRICS}); nothing is "
                "left to train: raise --max-steps or --epochs to train it further"
            )


def open_run_dir(out: Path, cfg: RunConfig, resume: bool, dist: Dist, data: dict[str, str]) -> None:
    """Check the run folder against --resume, write config.json and run.json (rank 0; `data` is the
    dataset's `data_identity`); nothing of value is overwritten.

    A folder holding a checkpoint or metrics needs --resume (`check_resume`); one holding only config.json
    (a run that failed before its first checkpoint) starts over; any other non-empty folder is refused.
    """
    if resume:
        check_resume(out, cfg, data)
    elif (out / CONFIG).is_file():
        names = (
            checkpoint.LAST,
            checkpoint.BEST,
            METRICS,
            CONTENT_TABLE,
            f"{STAGE1}/{checkpoint.LAST}",
            f"{STAGE1}/{METRICS}",
        )
        kept = [n for n in names if (out / n).exists()]
        if kept:
            raise MMRankError(
                f"{out}: already holds a run ({', '.join(kept)}); pass --resume or choose another --out"
            )
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MMRankError(f"{out}: exists and is not an empty folder or a run folder")
    # Every rank has looked at the folder before rank 0 writes into it: a rank still checking would
    # otherwise see rank 0's half-written config and refuse the folder.
    dist.barrier()
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / CONFIG, cfg.to_dict())
        write_record(out, data)
    dist.barrier()
