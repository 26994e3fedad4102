"""Training (`mmrank train`) and evaluation of a finished run (`mmrank evaluate`), SPEC §2.6 and §8.

One stage of training is a `Trainer`: AdamW with separate learning rates for the content tower and the
ranker, loss = BCE + the model's weighted auxiliary losses (CIC, SQDC), autocast per `train.amp`,
gradient clipping, validation every N steps or per epoch with early stopping on the best checkpoint,
and the best model evaluated on test at the end. Stages around it:
- `train.task_pe`: stage 1 (RUN/stage1/, a complete run of its own) trains the model end to end, its
  tower fills RUN/content_table.npy, stage 2 trains a fresh model on that table;
- the `pe` preset (fixed source without a table): RUN/content_table.npy is the PCA of the frozen features;
- `train.lora_epochs`: after `train.epochs`, `start_lora_phase()` and longer histories (EM3 §3.3.2).

Resume: every row order is a pure function of (seed, epoch) (`SampleSet.order`) and last.pt records
the batches consumed in the epoch, the RNG states of every process and the optimizer, so a resumed run
continues with the same batches and random draws as one that never stopped. Evaluation runs in eval
mode on a forked RNG and never writes the memory bank, so it does not perturb training either.

Streaming (`train.streaming`): one pass in time order over the train split cut into windows, then the
valid and the test window; each window is evaluated before the model trains on it (prequential), and
the final model is the run's model.

DDP: under `torchrun --nproc_per_node N` every process takes an equal share of each epoch's rows
(interleaved), gradients are all-reduced by DistributedDataParallel, the model all-gathers memory-bank
writes itself, and rank 0 evaluates and writes every file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from mmrank.errors import MMRankError
from trainer import checkpoint
from trainer.checkpoint import TrainState
from trainer.config import (
    TOPK_METRICS,
    RunConfig,
    from_dict,
    higher_is_better,
    parse_sets,
    resolve,
    stop_metric,
    validate,
)
from trainer.data.batch import Batch
from trainer.data.negatives import NegativeSampler
from trainer.data.samples import HistoryIndex, SampleSet, make_samples
from trainer.data.schema import SPLITS, Dataset, load_dataset, write_json_atomic
from trainer.evaluate import evaluate_ctr, evaluate_split, evaluate_topk, item_vectors, train_item_ids
from trainer.losses import bce, bpr
from trainer.model.pca_table import pca_table, save_content_table
from trainer.model.ranking_model import RankingModel
from trainer.run import (
    CONFIG,
    CONTENT_TABLE,
    METRICS,
    STAGE1,
    TRAIN_LOG,
    build_schema,
    final_model_config,
    load_run,
    on_own_table,
    read_config,
    restore,
)

# Keys a resumed run may change: when to stop, not what to train.
RESUMABLE_CHANGES = ("train.max_steps", "train.epochs")


# ---- processes ---------------------------------------------------------------------------------------


@dataclass
class Dist:
    """This process's place in the job; a single process is rank 0 of 1 with no process group."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def init(cls) -> Dist:
        """Join the torchrun job described by the environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_*)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cuda = torch.cuda.is_available()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        if world == 1:
            return cls(device=device)
        owns = not torch_dist.is_initialized()
        if owns:
            torch_dist.init_process_group("nccl" if cuda else "gloo")
        return cls(torch_dist.get_rank(), torch_dist.get_world_size(), device, owns)

    def close(self) -> None:
        if self.owns_group and torch_dist.is_initialized():
            torch_dist.destroy_process_group()

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch_dist.all_gather_object(out, obj)
        return out

    def shard(self, rows: np.ndarray) -> np.ndarray:
        """This rank's rows: an interleaved, equal share (the remainder is dropped so all ranks step together)."""
        per = len(rows) // self.world
        return rows[: per * self.world].reshape(per, self.world)[:, self.rank] if self.world > 1 else rows


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 where the GPU has it, else fp16 (with loss scaling); off on the CPU."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]


# ---- data --------------------------------------------------------------------------------------------


def take(samples: SampleSet, rows: np.ndarray) -> SampleSet:
    """The samples of `rows`, in that order (a stream window)."""
    h = samples.history
    return dataclasses.replace(
        samples,
        user_id=samples.user_id[rows],
        item_id=samples.item_id[rows],
        label=samples.label[rows],
        request_id=samples.request_id[rows],
        ts=samples.ts[rows],
        history=HistoryIndex(h.pos_item, h.start[rows], h.end[rows]),
    )


class _RowBatches(torch.utils.data.Dataset):
    """Batch i = rows[i * size : (i + 1) * size], for DataLoader workers."""

    def __init__(self, samples: SampleSet, rows: np.ndarray, size: int):
        self.samples, self.rows, self.size = samples, rows, size

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.size)

    def __getitem__(self, i: int) -> Batch:
        return self.samples.batch(self.rows[i * self.size : (i + 1) * self.size])


def batches(
    samples: SampleSet, rows: np.ndarray, size: int, start: int, workers: int, pin: bool
) -> Iterator[Batch]:
    """Batches of `rows` from batch index `start` on; built in worker processes when workers > 0."""
    rows = rows[start * size :]
    source = _RowBatches(samples, rows, size)
    if workers == 0:
        yield from (source[i] for i in range(len(source)))
        return
    # Batches are pure functions of rows; the loader's own generator keeps its worker seeding from
    # drawing on the global RNG, which must advance exactly as without workers (dropout, sampling).
    yield from torch.utils.data.DataLoader(
        source, batch_size=None, num_workers=workers, pin_memory=pin, generator=torch.Generator()
    )


# ---- one training stage ------------------------------------------------------------------------------


class Trainer:
    """Trains one model in `out` (fresh or resumed from out/last.pt) and returns its metrics."""

    def __init__(
        self, cfg: RunConfig, ds: Dataset, out: Path, dist: Dist, resume: bool, progress: bool | None
    ):
        self.cfg, self.t, self.ds, self.out, self.dist = cfg, cfg.train, ds, out, dist
        self.progress = progress
        self.model_cfg = final_model_config(cfg, out)
        self.device = dist.device
        seed_everything(cfg.seed)
        self.schema = build_schema(ds, self.model_cfg)
        self.model = RankingModel(self.model_cfg, self.schema).to(self.device)
        seed_everything(cfg.seed + 100_003 * dist.rank)  # per-process dropout and p/q sampling draws
        self.amp = amp_dtype(self.t.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.state = TrainState()
        self.optimizer = self._make_optimizer()
        self.resumed = resume and (out / checkpoint.LAST).is_file()
        if self.resumed:
            self._resume()
        self.ddp = self._wrap()
        self.topk = ds.manifest.topk_protocol
        self.stop_metric = stop_metric(self.t.early_stop_metric, self.topk)
        if self.stop_metric.startswith(TOPK_METRICS) and not self.topk:
            raise MMRankError(
                f"train.early_stop_metric={self.stop_metric!r} needs data with a top-K protocol"
            )
        self.history_splits = ("train",) if self.topk else tuple(SPLITS)
        self.train_items = train_item_ids(ds)
        self.negatives = self._negative_sampler() if self.model_cfg.loss.main == "bpr" else None
        self._samples: dict[tuple[str, int, int], SampleSet] = {}
        self._log_sums: dict[str, list[float]] = {}
        self._log_t0 = time.perf_counter()
        self._log_rows = 0
        self._saved_step = -1

    # -- setup
    def _negative_sampler(self) -> NegativeSampler:
        train = self.ds.split("train")
        pos = train[train["label"] == 1]
        return NegativeSampler(pos["user_id"].to_numpy(), pos["item_id"].to_numpy(), self.ds.num_items)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        groups = self.model.param_groups(self.t.lr_content, self.t.lr_ranker, self.t.weight_decay)
        return torch.optim.AdamW(groups, lr=self.t.lr_ranker)

    def _wrap(self) -> torch.nn.Module:
        if self.dist.world == 1:
            return self.model
        # The bank's writes are all-gathered by the model, so DDP need not broadcast buffers every step.
        return DistributedDataParallel(
            self.model, find_unused_parameters=self.t.ddp_find_unused_parameters, broadcast_buffers=False
        )

    def _resume(self) -> None:
        path = self.out / checkpoint.LAST
        ckpt = checkpoint.load(path, ("model", "optimizer", "scaler", "state", "rng"))
        if len(ckpt["rng"]) != self.dist.world:
            raise MMRankError(
                f"{path}: written by {len(ckpt['rng'])} process(es), resumed with {self.dist.world}; "
                "resume with the same --nproc_per_node"
            )
        self.state = TrainState.from_dict(ckpt["state"])
        if self.state.lora_phase:
            self.model.start_lora_phase()
            self.optimizer = self._make_optimizer()
        checkpoint.load_model_state(self.model, ckpt["model"], path)
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            raise MMRankError(f"{path}: optimizer state does not match the model ({e})") from e
        self.scaler.load_state_dict(ckpt["scaler"])
        checkpoint.set_rng_state(ckpt["rng"][self.dist.rank])

    def _start_lora_phase(self) -> None:
        self.model.start_lora_phase()
        self.model.to(self.device)
        self.optimizer = self._make_optimizer()
        self.ddp = self._wrap()
        self.state.lora_phase = True

    def lengths(self, lora_phase: bool) -> tuple[int, int]:
        it = final_model_config(self.cfg, self.out, lora_phase).interest
        return it.short_len, it.long_len

    def samples(self, split: str, lengths: tuple[int, int] | None = None) -> SampleSet:
        """A split's samples with histories of `lengths` (default: those of the current phase)."""
        short, long = lengths or self.lengths(self.state.lora_phase)
        key = (split, short, long)
        if key not in self._samples:
            samples = make_samples(self.ds, split, short, long, history_splits=self.history_splits)
            if split == "train" and self.negatives is not None:  # BPR pairs positives with sampled items
                samples = take(samples, np.flatnonzero(samples.label == 1))
            self._samples[key] = samples
        return self._samples[key]

    # -- one step
    def _step(self, batch: Batch) -> tuple[dict[str, float], dict[str, float]]:
        batch = batch.to(self.device)
        autocast = torch.autocast(self.device.type, self.amp) if self.amp is not None else nullcontext()
        with autocast:
            out = self.ddp(batch)
            if self.negatives is not None:
                negative = dataclasses.replace(batch, item_id=self.negatives.sample(batch.user_id))
                main = bpr(out.logits.float(), self.ddp(negative).logits.float())
            elif self.model_cfg.loss.main == "none":
                main = out.logits.new_zeros((), dtype=torch.float)
            else:
                main = bce(out.logits.float(), batch.label)
        aux = {name: value.float() for name, value in out.losses.items()}
        loss = main + sum(aux.values())
        value = loss.item()
        if not math.isfinite(value):
            raise MMRankError(
                f"loss is {value} at step {self.state.global_step + 1}: lower train.lr_* or set train.amp=off"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        values = {
            "loss": value,
            self.model_cfg.loss.main: main.item(),
            **{n: v.item() for n, v in aux.items()},
        }
        if self.t.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            values["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, self.t.grad_clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return values, out.stats

    def _train_rows(self, samples: SampleSet, rows: np.ndarray, bar: tqdm) -> bool:
        """Train on this rank's `rows` from the state's position; False when a stop condition hit."""
        s = self.state
        size = self.t.batch_size
        pin = self.device.type == "cuda"
        source = batches(samples, rows, size, s.batch_in_epoch, self.t.num_workers, pin)
        while True:
            t0 = time.perf_counter()  # batch building counts as training time
            batch = next(source, None)
            if batch is None:
                return True
            values, stats = self._step(batch)
            s.train_seconds += time.perf_counter() - t0
            s.batch_in_epoch += 1
            s.global_step += 1
            s.samples_seen += len(batch) * self.dist.world
            self._record(values, stats, len(batch) * self.dist.world, bar)
            if (
                self.t.eval_every_steps
                and s.global_step % self.t.eval_every_steps == 0
                and not self.t.streaming
            ):
                self._validate()
            if s.global_step % self.t.checkpoint_every_steps == 0:
                self._save_last()
            if s.stopped_early or self._at_max_steps():
                return False

    def _at_max_steps(self) -> bool:
        return 0 < self.t.max_steps <= self.state.global_step

    # -- logging
    def _record(self, values: dict[str, float], stats: dict[str, float], rows: int, bar: tqdm) -> None:
        for name, value in {**values, **stats}.items():
            self._log_sums.setdefault(name, []).append(value)
        self._log_rows += rows
        bar.update(1)
        if self.state.global_step % self.t.log_every:
            return
        now = time.perf_counter()
        line = {
            "event": "train",
            "step": self.state.global_step,
            "epoch": self.state.epoch,
            "samples_per_s": self._log_rows / max(now - self._log_t0, 1e-9),
            **{name: float(np.nanmean(v)) for name, v in self._log_sums.items()},
            **{f"lr/{g['name']}": g["lr"] for g in self.optimizer.param_groups},
        }
        self._log_sums, self._log_t0, self._log_rows = {}, now, 0
        bar.set_postfix(loss=f"{line['loss']:.4f}", samples_per_s=f"{line['samples_per_s']:.0f}")
        self._log(line, bar)

    def _log(self, line: dict, bar: tqdm | None = None) -> None:
        if not self.dist.main:
            return
        text = json.dumps(line, sort_keys=True, default=float)
        with open(self.out / TRAIN_LOG, "a") as f:
            f.write(text + "\n")
        if bar is None or bar.disable:
            print(f"train: {text}", file=sys.stderr)

    # -- evaluation and checkpoints
    def evaluate(
        self,
        model: torch.nn.Module,
        samples: SampleSet,
        split: str,
        train_items: np.ndarray,
        lengths: tuple[int, int],
    ) -> dict:
        """Rank 0 evaluates (the others wait); every rank gets the result."""
        metrics = None
        if self.dist.main:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                metrics = evaluate_ctr(model, samples, train_items, self.t.eval_batch_size, progress=False)
                if self.topk and split in ("valid", "test"):
                    metrics.update(
                        evaluate_topk(
                            model,
                            self.ds,
                            split,
                            self.t.topk,
                            short_len=lengths[0],
                            long_len=lengths[1],
                            progress=False,
                        )
                    )
        return self.dist.broadcast(metrics)

    def _validate(self) -> None:
        s = self.state
        metrics = self.evaluate(
            self.model, self.samples("valid"), "valid", self.train_items, self.lengths(s.lora_phase)
        )
        s.last_eval_step = s.global_step
        name = self.stop_metric
        value, higher = metrics.get(name), higher_is_better(name)
        if value is None:  # a null metric would keep the first checkpoint forever, silently
            known = sorted(k for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v))
            raise MMRankError(
                f"valid {name} is null on this data (defined: {', '.join(known) or 'none'}); "
                "choose one with --set train.early_stop_metric=NAME"
            )
        improved = (
            s.best_metric is None
            # Without a ranking loss the ranking metrics say nothing of the model: keep the latest.
            or self.model_cfg.loss.main == "none"
            or (value > s.best_metric if higher else value < s.best_metric)
        )
        if improved:
            s.best_metric, s.best_step, s.best_valid = value, s.global_step, metrics
            s.bad_evals = 0
            if self.dist.main:
                checkpoint.save_best(self.out / checkpoint.BEST, self.model, s)
        else:
            s.bad_evals += 1
            s.stopped_early = 0 < self.t.patience <= s.bad_evals
        self._log(
            {
                "event": "valid",
                "step": s.global_step,
                "epoch": s.epoch,
                "improved": improved,
                "stopped_early": s.stopped_early,
                **metrics,
            }
        )

    def _save_last(self) -> None:
        self._saved_step = self.state.global_step
        rng = self.dist.gather(checkpoint.rng_state())
        if self.dist.main:
            checkpoint.save_last(
                self.out / checkpoint.LAST, self.model, self.optimizer, self.scaler, self.state, rng
            )
        self.dist.barrier()

    def _bar(self, total: int) -> tqdm:
        disable = (None if self.progress is None else not self.progress) if self.dist.main else True
        return tqdm(
            total=total,
            initial=min(self.state.global_step, total),
            unit="step",
            desc="train",
            disable=disable,
            dynamic_ncols=True,
        )

    def _steps_per_epoch(self, n_rows: int) -> int:
        return math.ceil((n_rows // self.dist.world) / self.t.batch_size)

    # -- the loops
    def fit(self) -> None:
        """Epochs (phase 1, then the LoRA phase) until done, stopped early or at max_steps."""
        s, t = self.state, self.t
        epochs = t.epochs + t.lora_epochs
        total = self._steps_per_epoch(len(self.samples("train"))) * epochs
        total = min(total, t.max_steps) if t.max_steps else total
        with self._bar(total) as bar:
            while s.epoch < epochs and not s.stopped_early and not self._at_max_steps():
                if s.epoch >= t.epochs and not s.lora_phase:
                    self._start_lora_phase()
                samples = self.samples("train")
                rows = self.dist.shard(samples.order(s.epoch, self.cfg.seed, t.shuffle))
                if not self._train_rows(samples, rows, bar):
                    break
                s.epoch += 1
                s.batch_in_epoch = 0
                if not t.eval_every_steps:
                    self._validate()
                self._save_last()
        if s.last_eval_step != s.global_step or s.best_step < 0:
            self._validate()
        if self._saved_step != s.global_step:
            self._save_last()

    def stream_windows(self) -> list[tuple[str, str, int, int]]:
        """(name, split, first row, end row): the train split cut by time into equal windows, then valid, test."""
        n = len(self.samples("train"))
        cuts = np.linspace(0, n, self.t.stream_windows + 1).astype(int)
        windows = [
            (f"train{i}", "train", int(a), int(b))
            for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True))
        ]
        return windows + [(split, split, 0, len(self.samples(split))) for split in ("valid", "test")]

    def stream(self) -> None:
        """One time-ordered pass; window w is evaluated (items of windows < w count as seen) before training on it."""
        s = self.state
        windows = self.stream_windows()
        total = sum(self._steps_per_epoch(b - a) for _, _, a, b in windows)
        total = min(total, self.t.max_steps) if self.t.max_steps else total
        with self._bar(total) as bar:
            while s.epoch < len(windows) and not self._at_max_steps():
                self._stream_eval(windows, s.epoch)
                _, split, lo, hi = windows[s.epoch]
                if not self._train_rows(self.samples(split), self.dist.shard(np.arange(lo, hi)), bar):
                    break
                s.epoch += 1
                s.batch_in_epoch = 0
                self._save_last()
        for w, (_, split, _, _) in enumerate(windows):
            if split != "train":
                self._stream_eval(windows, w)
        self._save_last()  # the evaluations above belong to the state
        if self.dist.main:
            checkpoint.save_best(self.out / checkpoint.BEST, self.model, s)

    def _stream_eval(self, windows: list[tuple[str, str, int, int]], w: int) -> None:
        s = self.state
        if w == 0 or any(entry["window"] == windows[w][0] for entry in s.windows):
            return
        seen = [self.samples(split).item_id[lo:hi] for _, split, lo, hi in windows[:w]]
        name, split, lo, hi = windows[w]
        metrics = self.evaluate(
            self.model,
            take(self.samples(split), np.arange(lo, hi)),
            split,
            np.unique(np.concatenate(seen)),
            self.lengths(False),
        )
        s.windows.append({"window": name, "split": split, "step": s.global_step, **metrics})
        self._log({"event": "stream_eval", **s.windows[-1]})

    def run(self) -> dict:
        """Train, then evaluate the best model on test; returns (and rank 0 writes) metrics.json."""
        t0 = time.perf_counter()
        if self.t.streaming:
            self.stream()
        else:
            self.fit()
        metrics = self._final_metrics()
        metrics["train"].update(wall_s=time.perf_counter() - t0, resumed=self.resumed)
        if self.dist.main:
            write_json_atomic(self.out / METRICS, metrics)
        self.dist.barrier()
        return metrics

    def _final_metrics(self) -> dict:
        s = self.state
        if self.t.streaming:
            by_split = {e["split"]: e for e in s.windows if e["split"] != "train"}
            valid, test = by_split.get("valid", {}), by_split.get("test", {})
            stopped = "max_steps" if self._at_max_steps() else "stream_end"
        else:
            best_cfg, best = restore(self.cfg, self.out, self.ds, self.out / checkpoint.BEST, self.schema)
            best.to(self.device)
            lengths = (best_cfg.interest.short_len, best_cfg.interest.long_len)
            valid = s.best_valid
            test = self.evaluate(best, self.samples("test", lengths), "test", self.train_items, lengths)
            stopped = "early_stop" if s.stopped_early else "max_steps" if self._at_max_steps() else "epochs"
        params = list(self.model.parameters())
        train = {
            "samples_per_s": s.samples_seen / s.train_seconds if s.train_seconds else 0.0,
            "train_s": s.train_seconds,
            "steps": s.global_step,
            "epochs": s.epoch,
            "samples": s.samples_seen,
            "stopped": stopped,
            "best_step": s.best_step,
            "world_size": self.dist.world,
            "device": str(self.device),
            "data": str(Path(self.ds.root).resolve()),
            "amp": str(self.amp).replace("torch.", "") if self.amp else "off",
            "parameters": sum(p.numel() for p in params),
            "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        }
        out = {"valid": valid, "test": test, "train": train}
        if self.t.streaming:
            out["stream"] = s.windows
        return out


# ---- run folders and stages --------------------------------------------------------------------------


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _differences(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.append(f"{prefix}{k}")
    return out


def open_run_dir(out: Path, cfg: RunConfig, resume: bool, dist: Dist) -> None:
    """Check the run folder against --resume and write config.json (rank 0); nothing of value is overwritten.

    A folder holding a checkpoint or metrics needs --resume; one holding only config.json (a run that
    failed before its first checkpoint) starts over; any other non-empty folder is refused.
    """
    has_run = (out / CONFIG).is_file()
    if resume:
        if not has_run:
            raise MMRankError(f"{out}: nothing to resume (no {CONFIG})")
        saved = read_config(out)
        diff = [k for k in _differences(saved.to_dict(), cfg.to_dict()) if k not in RESUMABLE_CHANGES]
        if diff:
            raise MMRankError(
                f"{out}: the config differs from the run's {CONFIG} in {', '.join(diff[:4])}; "
                f"resume with --config {out / CONFIG}"
            )
    elif has_run:
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
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        if not resume and (out / TRAIN_LOG).exists():
            (out / TRAIN_LOG).unlink()
        write_json_atomic(out / CONFIG, cfg.to_dict())
    dist.barrier()


def stage1_config(cfg: RunConfig) -> RunConfig:
    """task_pe stage 1: the same model trained end to end for task_pe_epochs (no LoRA phase)."""
    stage = from_dict(cfg.to_dict())
    stage.train.task_pe = False
    stage.train.epochs = cfg.train.task_pe_epochs
    stage.train.lora_epochs = 0
    if cfg.train.task_pe_stage1_loss != "same":
        stage.model.loss.main = cfg.train.task_pe_stage1_loss
    stage.description = (
        f"task_pe stage 1 of {cfg.preset or 'a config'}: end-to-end training for the content table"
    )
    return stage


def build_content_table(ds: Dataset, cfg: RunConfig, out: Path, dist: Dist, stage1: Path | None) -> None:
    """RUN/content_table.npy: the stage-1 tower's vectors (task_pe) or the PCA of frozen features (pe)."""
    path = out / CONTENT_TABLE
    if dist.main and not path.is_file():
        if stage1 is not None:
            _, model = load_run(stage1, ds)
            with torch.no_grad():
                table = item_vectors(model, ds.num_items).float().numpy()
        else:
            schema = build_schema(ds, cfg.model, build_table=True)
            table = pca_table(schema.modalities, cfg.model.content.d)
        save_content_table(table, path)
    dist.barrier()


def train_stages(
    ds: Dataset, cfg: RunConfig, out: Path, resume: bool, dist: Dist, progress: bool | None
) -> dict:
    open_run_dir(out, cfg, resume, dist)
    stage1 = None
    if cfg.train.task_pe:
        stage1_dir = out / STAGE1
        if resume and (stage1_dir / METRICS).is_file():
            stage1 = json.loads((stage1_dir / METRICS).read_text())
        else:
            stage1 = train_stages(
                ds, stage1_config(cfg), stage1_dir, resume and (stage1_dir / CONFIG).is_file(), dist, progress
            )
        build_content_table(ds, cfg, out, dist, stage1_dir)
    elif on_own_table(cfg):
        build_content_table(ds, cfg, out, dist, None)
    metrics = Trainer(cfg, ds, out, dist, resume, progress).run()
    if stage1 is not None:
        metrics["stage1"] = stage1
        if dist.main:
            write_json_atomic(out / METRICS, metrics)
    return metrics


def train(
    data_dir: str | Path, cfg: RunConfig, out: str | Path, resume: bool = False, progress: bool | None = None
) -> dict:
    """Train `cfg` on the dataset in `data_dir` into the run folder `out`; returns metrics.json's content."""
    validate(cfg)
    ds = load_dataset(data_dir)
    dist = Dist.init()
    try:
        return train_stages(ds, cfg, Path(out), resume, dist, progress)
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


def evaluate_run(run_dir: str | Path, data_dir: str | Path) -> dict:
    """Valid and test metrics of a run's best model on a dataset; written to RUN/evaluation.json."""
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
