"""Stages around the training loop: task-specific PE / LEMUR two-stage and the `pe` table.

- `train.task_pe`: stage 1 (RUN/stage1/, a complete run of its own) trains the model end to end (with
  `train.task_pe_stage1_loss = none`, by its auxiliary losses alone), its tower fills
  RUN/content_table.npy, stage 2 trains a fresh model on that table;
- the `pe` preset (fixed source without a table): RUN/content_table.npy is the PCA of the frozen features.
The LoRA schedule (`train.lora_epochs`) runs inside one stage: `Trainer.fit`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from common.atomic import write_json_atomic
from trainer.config import RunConfig, from_dict
from trainer.data.schema import Dataset
from trainer.evaluate import item_vectors
from trainer.model.pca_table import pca_table, save_content_table
from trainer.run import (
    CONFIG,
    CONTENT_TABLE,
    METRICS,
    STAGE1,
    build_schema,
    data_identity,
    load_run,
    on_own_table,
)
from trainer.train.distributed import Dist
from trainer.train.loop import Trainer
from trainer.train.run_dir import open_run_dir


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
    open_run_dir(out, cfg, resume, dist, data_identity(ds.root))
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
