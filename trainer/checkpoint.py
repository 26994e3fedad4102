"""Checkpoints: RUN/last.pt (everything needed to resume) and RUN/best.pt (the best model so far).

last.pt holds the model (memory bank buffers included), optimizer, loss scaler, the data position
(epoch and batches consumed in it), the global step, the early-stopping state and every process's RNG
states, so a killed run resumes exactly where its last checkpoint was written. Files are written to a
temporary sibling and renamed into place: a kill during a write leaves the previous file intact. An
improvement writes last.pt, then best.pt: a kill between the two leaves a last.pt that records the new
best step and holds its model, from which a resume rewrites best.pt (`Trainer._repair_best`).
Everything is stored as tensors and plain Python values, so files load with `weights_only=True`.

Both files carry `format` (FORMAT_VERSION); a file of another format is refused, naming both versions.
Version 2: the train state holds `log_lines`, the model the ranker's `item_known` buffer and no memory
bank default vector.
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from common.errors import MMRankError

FORMAT_VERSION = 2
LAST = "last.pt"
BEST = "best.pt"


@dataclass
class TrainState:
    """Where training stands; the position is the next batch to consume."""

    epoch: int = 0  # epoch in progress (a stream window in streaming mode)
    batch_in_epoch: int = 0  # batches of that epoch already consumed (per process)
    global_step: int = 0  # optimizer steps taken
    lora_phase: bool = False  # model.start_lora_phase() has been called
    last_eval_step: int = -1  # global step of the latest validation
    best_metric: float | None = None  # best validation value of the early-stopping metric
    best_step: int = -1
    best_valid: dict = field(default_factory=dict)  # every validation metric at the best step
    bad_evals: int = 0  # validations since the last improvement
    stopped_early: bool = False
    phase1_stopped_early: bool = False  # early stopping ended phase 1; the LoRA phase started from its best
    samples_seen: int = 0  # training rows consumed, all processes together
    train_seconds: float = 0.0  # wall time spent in training steps (evaluation excluded)
    windows: list = field(default_factory=list)  # streaming: per-window prequential metrics
    log_lines: int = 0  # lines of RUN/train_log.jsonl written so far; a resume drops any later ones

    @classmethod
    def from_dict(cls, raw: dict) -> TrainState:
        """The state a checkpoint of this format holds: exactly these fields (MMRankError otherwise)."""
        names = {f.name for f in fields(cls)}
        missing, unknown = sorted(names - set(raw)), sorted(set(raw) - names)
        if missing or unknown:
            raise MMRankError(
                f"train state fields differ from this format's: missing {missing}, unknown {unknown}"
            )
        return cls(**raw)


def rng_state() -> dict:
    """This process's RNG states (Python, NumPy global, torch CPU and CUDA) as checkpointable values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj: dict, path: str | Path) -> None:
    """torch.save to a temporary sibling, then rename: readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load(path: str | Path, expect: tuple[str, ...] = ("model",), mmap: bool = False) -> dict:
    """Read a checkpoint written by this module; a missing, truncated or foreign file is a MMRankError.
    `mmap`: tensors are mapped from the file, not read, for a caller that needs only its plain values
    (state, step)."""
    path = Path(path)
    if not path.is_file():
        raise MMRankError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many types (pickle, zip, runtime) for a damaged file
        raise MMRankError(
            f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from e
    if not isinstance(obj, dict) or "format" not in obj:
        raise MMRankError(f"{path}: not a mmrank checkpoint (no format field)")
    if obj["format"] != FORMAT_VERSION:
        raise MMRankError(
            f"{path}: checkpoint format {obj['format']!r}, this version reads format {FORMAT_VERSION}; "
            "train the run again"
        )
    missing = [k for k in expect if k not in obj]
    if missing:
        raise MMRankError(f"{path}: checkpoint lacks {', '.join(missing)}")
    if "state" in obj:
        try:
            TrainState.from_dict(obj["state"])
        except MMRankError as e:
            raise MMRankError(f"{path}: {e}") from e
    return obj


def save_last(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    state: TrainState,
    rng_states: list[dict],
) -> None:
    """The full resume point; `rng_states` holds one entry per process (rank order)."""
    save_atomic(
        {
            "format": FORMAT_VERSION,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "state": asdict(state),
            "rng": rng_states,
        },
        path,
    )


def save_best(path: str | Path, model: torch.nn.Module, state: TrainState) -> None:
    save_atomic(
        {
            "format": FORMAT_VERSION,
            "model": model.state_dict(),
            "step": state.global_step,
            "metric": state.best_metric,
            "lora_phase": state.lora_phase,
        },
        path,
    )


def load_model_state(model: torch.nn.Module, state_dict: dict, path: str | Path) -> None:
    """Strict load with a one-line error when the checkpoint does not fit the configured model."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        first = str(e).splitlines()
        detail = " ".join(line.strip() for line in first[:2])[:300]
        raise MMRankError(f"{path}: checkpoint does not match the model config ({detail})") from e
