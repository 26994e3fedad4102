"""One stage of training: the `Trainer` loop (docs/design.md, "Training schedule").

AdamW with separate learning rates for the content tower and the ranker, loss = the main loss (BCE,
or BPR against sampled negatives, or none) + the model's weighted auxiliary losses (CIC, SQDC),
autocast per `train.amp`, gradient clipping, validation every N steps or per epoch with early stopping
on the best checkpoint, and the best model evaluated on test at the end. `train.lora_epochs`: after
`train.epochs`, `start_lora_phase()` and longer histories (EM3 §3.3.2); an early stop ends phase 1
only, and the LoRA phase starts from phase 1's best weights with its own patience.

Resume: every row order is a pure function of (seed, epoch) (`SampleSet.order`) and last.pt records
the batches consumed in the epoch, the RNG states of every process and the optimizer, so a resumed run
continues with the same batches and random draws as one that never stopped. Evaluation runs in eval
mode on a forked RNG and never writes the memory bank, so it does not perturb training either. A stop
at train.max_steps leaves the early-stopping state and best.pt as they were, so resuming it continues
the run that never stopped (one that falls on the schedule's last batch finishes the run as that one
does); train_log.jsonl is cut back to the lines last.pt accounts for. Every improving validation also
writes last.pt (model, optimizer and RNG states: about three times the model, plus a barrier) before
best.pt, because that keeps best.pt from being newer than every resume point: a kill between the two is
repaired from last.pt, and a resume continues early stopping from the state its best.pt belongs to.

Streaming (`train.streaming`) is the other way through the same loop: `trainer.train.streaming`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from common import provenance
from common.atomic import write_json_atomic
from common.errors import MMRankError
from trainer import checkpoint
from trainer.checkpoint import TrainState
from trainer.config import RunConfig, TrainConfig, higher_is_better, stop_metric
from trainer.data.batch import Batch
from trainer.data.negatives import NegativeSampler
from trainer.data.samples import SampleSet, make_samples
from trainer.data.schema import SPLITS, Dataset
from trainer.evaluate import evaluate_ctr, evaluate_topk, train_item_ids
from trainer.losses import bce, bpr
from trainer.model.build import build_model
from trainer.run import METRICS, TRAIN_LOG, build_schema, data_identity, final_model_config, restore
from trainer.train.batches import batches, take
from trainer.train.distributed import Dist, seed_everything
from trainer.train.streaming import stream


def trains_further(s: TrainState, t: TrainConfig) -> bool:
    """Whether a run in state `s` has steps left under `t`."""
    if 0 < t.max_steps <= s.global_step:
        return False
    if t.streaming:
        return s.epoch < t.stream_windows + 2  # the train windows, then valid and test (`stream_windows`)
    if s.stopped_early:  # an early stop ends its phase; the LoRA phase still follows phase 1
        return t.lora_epochs > 0 and not s.lora_phase
    return s.epoch < t.epochs + t.lora_epochs


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 where the GPU has it, else fp16 (with loss scaling); off on the CPU."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]


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
        self.model = build_model(self.model_cfg, self.schema).to(self.device)
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
        self.stop_metric = stop_metric(self.t.early_stop_metric, self.topk)  # checked by config.validate
        self.history_splits = ("train",) if self.topk else tuple(SPLITS)
        self.train_items = train_item_ids(ds)
        self.negatives = self._negative_sampler() if self.model_cfg.loss.main == "bpr" else None
        self._samples: dict[tuple[str, int, int], SampleSet] = {}
        self._log_sums: dict[str, list[float]] = {}
        self._log_t0 = time.perf_counter()
        self._log_rows = 0
        # training losses and seconds since the latest validation, reported with it (progress per epoch)
        self._losses_since_valid: list[float] = []
        self._train_s_at_valid = self.state.train_seconds
        self._saved_step = -1  # step of the latest last.pt, -1 once the state has changed since
        # (step, valid metrics) of a model saved to best.pt only to be reported (`_report_current`)
        self._reported: tuple[int, dict] | None = None
        if dist.main:
            self._truncate_log()

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
        self._repair_best()

    def _repair_best(self) -> None:
        """best.pt is written right after the last.pt that records it: a kill between the two leaves a
        best.pt behind a last.pt whose own model is the best one, and best.pt is rewritten from it. Any
        other best.pt than the one last.pt records is refused."""
        s, path = self.state, self.out / checkpoint.BEST
        if s.best_step < 0:  # not validated yet: a best.pt there only reports a max-steps stop
            return
        step = checkpoint.load(path, ("step",), mmap=True)["step"] if path.is_file() else None
        if step == s.best_step:
            return
        if s.best_step != s.global_step:
            raise MMRankError(
                f"{path}: holds step {step}, but {checkpoint.LAST} records the best model at step "
                f"{s.best_step}, which no file holds; train again in another --out"
            )
        self.dist.barrier()  # every rank has read best.pt's step before rank 0 replaces it
        self.save_best(s)

    def _truncate_log(self) -> None:
        """Drop the lines a crashed attempt logged after its last checkpoint: the resumed run logs those
        steps again. Written to a temporary sibling and renamed, so a kill keeps the old log."""
        path = self.out / TRAIN_LOG
        lines = path.read_text().splitlines(keepends=True) if path.is_file() else []
        if len(lines) <= self.state.log_lines:
            return
        tmp = path.with_name(f".{TRAIN_LOG}.tmp")
        tmp.write_text("".join(lines[: self.state.log_lines]))
        os.replace(tmp, path)

    def _start_lora_phase(self) -> None:
        """EM3 §3.3.2: freeze the content tower trained in phase 1 and add LoRA adapters. Each phase has
        its own patience; after an early stop, phase 1's weights are its best ones (best.pt, which stays
        the best of the whole run) and the LoRA phase starts at its first epoch."""
        s = self.state
        if s.stopped_early:
            best = self.out / checkpoint.BEST
            checkpoint.load_model_state(self.model, checkpoint.load(best)["model"], best)
            s.epoch, s.batch_in_epoch = self.t.epochs, 0
            s.stopped_early, s.phase1_stopped_early = False, True
        s.bad_evals = 0
        self.model.start_lora_phase()
        self.model.to(self.device)
        self.optimizer = self._make_optimizer()
        self.ddp = self._wrap()
        s.lora_phase = True

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
        # Negatives are scored in the same forward as the positives: one DDP forward per backward, and
        # the model treats them as candidates, not as training targets (RankingModel.forward).
        negatives = None if self.negatives is None else self.negatives.sample(batch.user_id)
        with autocast:
            out = self.ddp(batch, negatives)
            if negatives is not None:
                main = bpr(out.logits.float(), out.negative_logits.float())
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
            **({} if self.model_cfg.loss.main == "none" else {self.model_cfg.loss.main: main.item()}),
            **{n: v.item() for n, v in aux.items()},
        }
        if self.t.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            values["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, self.t.grad_clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return values, out.stats

    def train_rows(self, samples: SampleSet, rows: np.ndarray, bar: tqdm) -> bool:
        """Train on this rank's `rows` from the state's position; False when a stop condition hit before
        their end (an early stop, or max_steps short of the last batch: one on it ends the epoch)."""
        s = self.state
        size = self.t.batch_size
        n_batches = math.ceil(len(rows) / size)
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
                self._checkpoint()
            if s.stopped_early:
                return False
            if self.at_max_steps():
                return s.batch_in_epoch >= n_batches

    def at_max_steps(self) -> bool:
        """train.max_steps is set and reached."""
        return 0 < self.t.max_steps <= self.state.global_step

    # -- logging
    def _record(self, values: dict[str, float], stats: dict[str, float], rows: int, bar: tqdm) -> None:
        for name, value in {**values, **stats}.items():
            self._log_sums.setdefault(name, []).append(value)
        self._losses_since_valid.append(values["loss"])
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
        self.log(line, bar)

    def log(self, line: dict, bar: tqdm | None = None, summary: str | None = None) -> None:
        """One structured line of RUN/train_log.jsonl (rank 0), echoed to stderr (as `summary` where
        given) without a progress bar."""
        if not self.dist.main:
            return
        text = json.dumps(line, sort_keys=True, default=float)
        with open(self.out / TRAIN_LOG, "a") as f:
            f.write(text + "\n")
        self.state.log_lines += 1
        if bar is None or bar.disable:
            print(f"train: {summary or text}", file=sys.stderr)

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

    def _valid_metrics(self) -> tuple[dict, float]:
        """The current model's validation metrics and its value of the early-stopping metric."""
        metrics = self.evaluate(
            self.model, self.samples("valid"), "valid", self.train_items, self.lengths(self.state.lora_phase)
        )
        value = metrics.get(self.stop_metric)
        if value is None:  # a null metric would keep the first checkpoint forever, silently
            known = sorted(k for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v))
            raise MMRankError(
                f"valid {self.stop_metric} is null on this data (defined: {', '.join(known) or 'none'}); "
                "choose one with --set train.early_stop_metric=NAME"
            )
        return metrics, value

    def _validate(self) -> None:
        s = self.state
        t0 = time.perf_counter()
        metrics, value = self._valid_metrics()
        progress = {
            "train_s": s.train_seconds - self._train_s_at_valid,
            "train_loss": float(np.mean(self._losses_since_valid)) if self._losses_since_valid else None,
            "valid_s": time.perf_counter() - t0,
        }
        self._losses_since_valid, self._train_s_at_valid = [], s.train_seconds
        s.last_eval_step = s.global_step
        improved = (
            s.best_metric is None
            # Without a ranking loss the ranking metrics say nothing of the model: keep the latest.
            or self.model_cfg.loss.main == "none"
            or (value > s.best_metric if higher_is_better(self.stop_metric) else value < s.best_metric)
        )
        if improved:
            s.best_metric, s.best_step, s.best_valid = value, s.global_step, metrics
            s.bad_evals = 0
        else:
            s.bad_evals += 1
            s.stopped_early = 0 < self.t.patience <= s.bad_evals
        self._saved_step = -1
        line = {
            "event": "valid",
            "step": s.global_step,
            "epoch": s.epoch,
            "improved": improved,
            "stopped_early": s.stopped_early,
            "best_step": s.best_step,
            **progress,
            **metrics,
        }
        self.log(line, summary=self._valid_summary(line, value))
        if improved:  # last.pt first (see `_repair_best`)
            self.save_last()
            self.save_best(s)

    def _valid_summary(self, line: dict, value: float) -> str:
        """The stderr form of a validation line: where, how long, the loss and the stopping metric."""
        s, loss = self.state, line["train_loss"]
        return (
            f"epoch {s.epoch} step {s.global_step}: train {line['train_s']:.1f} s"
            + (f", loss {loss:.4f}" if loss is not None else "")
            + f"; valid {line['valid_s']:.1f} s, {self.stop_metric} {value:.4f}"
            + (" (best)" if line["improved"] else f" (best {s.best_metric:.4f} at step {s.best_step})")
            + ("; stopping early" if s.stopped_early else "")
        )

    def _report_current(self) -> None:
        """A run stopped at max_steps before its first validation still reports, evaluates and exports a
        model: the current one, validated outside the early-stopping state and saved as best.pt until the
        resumed run's first validation replaces it."""
        s = self.state
        metrics, value = self._valid_metrics()
        self._reported = (s.global_step, metrics)
        self.save_best(dataclasses.replace(s, best_metric=value))

    def save_best(self, state: TrainState) -> None:
        """best.pt (rank 0); every rank waits for it, so none loads or restores a best.pt not yet written."""
        if self.dist.main:
            checkpoint.save_best(self.out / checkpoint.BEST, self.model, state)
        self.dist.barrier()

    def save_last(self) -> None:
        """last.pt from the current state (every rank's RNG gathered); every rank waits for it."""
        self._saved_step = self.state.global_step
        rng = self.dist.gather(checkpoint.rng_state())
        if self.dist.main:
            checkpoint.save_last(
                self.out / checkpoint.LAST, self.model, self.optimizer, self.scaler, self.state, rng
            )
        self.dist.barrier()

    def _checkpoint(self) -> None:
        """last.pt, unless it already holds the current state."""
        if self._saved_step != self.state.global_step:
            self.save_last()

    def progress_bar(self, epoch_rows: list[int]) -> tqdm:
        """The step bar of a pass over epochs (or stream windows) of `epoch_rows` rows each, capped at
        train.max_steps; shown by rank 0 only."""
        total = sum(self._steps_per_epoch(n) for n in epoch_rows)
        total = min(total, self.t.max_steps) if self.t.max_steps else total
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
        with self.progress_bar([len(self.samples("train"))] * (t.epochs + t.lora_epochs)) as bar:
            while trains_further(s, t):
                if not s.lora_phase and (s.epoch >= t.epochs or s.stopped_early):
                    self._start_lora_phase()
                samples = self.samples("train")
                self.model.new_epoch(s.epoch, self.cfg.seed)
                rows = self.dist.shard(samples.order(s.epoch, self.cfg.seed, t.shuffle))
                if self.train_rows(samples, rows, bar):
                    s.epoch += 1
                    s.batch_in_epoch = 0
                    if not t.eval_every_steps:
                        self._validate()
                    self._checkpoint()
        self._finish()

    def _complete(self) -> bool:
        """Nothing is left to train, even without train.max_steps."""
        return not trains_further(self.state, dataclasses.replace(self.t, max_steps=0))

    def _finish(self) -> None:
        """A complete run validates its final model; a run stopped at max_steps is not over (--resume
        continues it), so its early-stopping state and best.pt stay as a run that never stopped has them."""
        s = self.state
        if self._complete():
            if s.last_eval_step != s.global_step:
                self._validate()
        elif s.best_step < 0:
            self._report_current()
        self._checkpoint()

    def run(self) -> dict:
        """Train, then evaluate the best model on test; returns (and rank 0 writes) metrics.json."""
        t0, started = time.perf_counter(), provenance.record()
        if self.t.streaming:
            stream(self)
        else:
            self.fit()
        metrics = self._final_metrics()
        metrics["train"].update(wall_s=time.perf_counter() - t0, resumed=self.resumed)
        metrics["provenance"] = started
        if self.dist.main:
            write_json_atomic(self.out / METRICS, metrics)
        self.dist.barrier()
        return metrics

    def _final_metrics(self) -> dict:
        s = self.state
        best_step = s.best_step
        if self.t.streaming:
            by_split = {e["split"]: e for e in s.windows if e["split"] != "train"}
            valid, test = by_split.get("valid", {}), by_split.get("test", {})
            stopped = "stream_end" if self._complete() else "max_steps"
        else:
            best_cfg, best = restore(self.cfg, self.out, self.ds, self.out / checkpoint.BEST, self.schema)
            best.to(self.device)
            lengths = (best_cfg.interest.short_len, best_cfg.interest.long_len)
            best_step, valid = self._reported or (best_step, s.best_valid)
            test = self.evaluate(best, self.samples("test", lengths), "test", self.train_items, lengths)
            stopped = ("early_stop" if s.stopped_early else "epochs") if self._complete() else "max_steps"
        params = list(self.model.parameters())
        data = data_identity(self.ds.root)
        train = {
            "samples_per_s": s.samples_seen / s.train_seconds if s.train_seconds else 0.0,
            "train_s": s.train_seconds,
            "steps": s.global_step,
            "epochs": s.epoch,
            "samples": s.samples_seen,
            "stopped": stopped,
            "best_step": best_step,
            "world_size": self.dist.world,
            "device": str(self.device),
            "data": data["path"],
            "data_manifest_sha256": data["manifest_sha256"],
            "lora_phase": s.lora_phase,  # whether the LoRA phase ran
            "amp": str(self.amp).replace("torch.", "") if self.amp else "off",
            "parameters": sum(p.numel() for p in params),
            "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        }
        if self.t.lora_epochs:
            train["phase1_stopped_early"] = s.phase1_stopped_early
        out = {"valid": valid, "test": test, "train": train}
        if self.t.streaming:
            out["stream"] = s.windows
        return out
