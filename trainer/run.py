"""A run folder and the model it describes: build the model (RankingModel, or a two-tower graph model:
`trainer.model.build`) from a dataset and a RunConfig, and load a finished run back (`load_run`) for
evaluation and export.

RUN/ holds config.json (the full resolved config), run.json (the folder's format version and the dataset
it trains on), metrics.json, train_log.jsonl, last.pt, best.pt and, for runs on a fixed content table,
content_table.npy. A folder whose run.json is missing or of another format is refused by every reader
(`read_config`, `recorded_data`). config.json describes what was asked; the model
in best.pt may differ from `cfg.model` in two documented ways, both resolved by `final_model_config`:
- a fixed content source without a table (the `pe` preset) or `train.task_pe` reads RUN/content_table.npy
  (pe: PCA of the frozen features; task_pe: the stage-1 tower's vectors, stage 1 living in RUN/stage1/);
- a best checkpoint from the LoRA phase was trained with `train.lora_history_len`-item histories and
  carries LoRA adapters.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.atomic import write_json_atomic
from common.errors import MMRankError
from trainer import checkpoint
from trainer.config import RunConfig, from_dict, load_json
from trainer.data.schema import MANIFEST, Dataset
from trainer.features.store import ItemFeatures, load_item_features
from trainer.model.build import build_model, is_graph_model
from trainer.model.config import ModelConfig
from trainer.model.freedom import graph_modalities
from trainer.model.ranking_model import ModelSchema

CONFIG = "config.json"
RUN = "run.json"
FORMAT_VERSION = 1  # of a run folder, recorded in its run.json
METRICS = "metrics.json"
TRAIN_LOG = "train_log.jsonl"
CONTENT_TABLE = "content_table.npy"
STAGE1 = "stage1"


def uses_content(cfg: ModelConfig) -> bool:
    """Whether RankingModel builds a content tower (mirrors its constructor's rule)."""
    r, loss = cfg.ranker, cfg.loss
    return r.use_content_item or r.use_content_user or loss.cic_alpha > 0 or loss.sqdc_lambda > 0


def on_own_table(cfg: RunConfig) -> bool:
    """The final model reads RUN/content_table.npy: task_pe, or a fixed source without a table (pe)."""
    c = cfg.model.content
    return cfg.train.task_pe or (c.source == "fixed" and not c.fixed_table)


def final_model_config(cfg: RunConfig, run_dir: str | Path, lora_phase: bool = False) -> ModelConfig:
    """The ModelConfig of the model trained (or loaded) in `run_dir` (see the module docstring)."""
    m = copy.deepcopy(cfg.model)
    if on_own_table(cfg):
        m.content.source = "fixed"
        m.content.fixed_table = str(Path(run_dir) / CONTENT_TABLE)
    if lora_phase:
        m.interest.short_len = cfg.train.lora_history_len
    return m


def needed_modalities(cfg: ModelConfig, build_table: bool) -> list[str]:
    """Cached modalities the model (or the pe table about to be built) reads."""
    c = cfg.content
    if not uses_content(cfg) or (c.source == "fixed" and not build_table):
        return []
    return [
        m for m in c.modalities if not (m == "text" and c.encoder_mode == "trainable" and c.source == "tower")
    ]


def _modality_fix(features: ItemFeatures) -> str:
    """The `--set` that points the model at the modalities the data has (or the command building them)."""
    have = sorted(features.modalities)
    return (
        f"--set 'model.content.modalities={json.dumps(have)}'"
        if have
        else "build them with `mmrank features`"
    )


def build_schema(ds: Dataset, cfg: ModelConfig, build_table: bool = False) -> ModelSchema:
    """Sizes, categorical tables, the item features `cfg` needs (from the feature cache) and, for the
    trainable text encoder, the per-item token table; for a graph model, the training interactions."""
    m = ds.manifest
    items = ds.items.sort_values("item_id")
    cat_cols = list(m.item_categoricals)
    item_cats = np.zeros((ds.num_items + 1, len(cat_cols)), dtype=np.int64)
    if cat_cols:
        item_cats[items["item_id"].to_numpy()] = items[cat_cols].to_numpy(dtype=np.int64)
    train_edges = None
    if is_graph_model(cfg):
        modalities, tokens = _tensors(ds, graph_modalities_wanted(ds, cfg)), None
        train = ds.split("train")
        positives = train[train["label"] == 1]
        train_edges = (positives["user_id"].to_numpy(), positives["item_id"].to_numpy())
    else:
        modalities, tokens = _content_inputs(ds, cfg, items, build_table)
    return ModelSchema(
        num_items=ds.num_items,
        num_users=ds.num_users,
        item_cats=torch.from_numpy(item_cats),
        item_cat_cards=tuple(int(v) for v in m.item_categoricals.values()),
        user_feat_cards=tuple(int(v) for v in m.user_features.values()),
        modalities=modalities,
        tokens=tokens,
        train_edges=train_edges,
    )


def graph_modalities_wanted(ds: Dataset, cfg: ModelConfig) -> list[str]:
    """The item features a graph model reads: none for LightGCN, else `graph.modalities` or every one
    the dataset has (MMRec's `*_feat.npy` files, the feature cache's text and image)."""
    if cfg.graph.model == "lightgcn":
        return []
    try:
        return graph_modalities(cfg, load_item_features(ds.root).modalities)
    except MMRankError as e:
        raise MMRankError(f"{ds.root}: {e}") from e


def _tensors(ds: Dataset, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The named item features of the dataset as tensors (features [n + 1, K, D], mask [n + 1, K])."""
    if not names:
        return {}
    features = load_item_features(ds.root)
    out = {}
    for name in names:
        feats, mask = features.modalities[name]
        out[name] = (torch.from_numpy(np.array(feats, dtype=np.float32)), torch.from_numpy(np.array(mask)))
    return out


def _content_inputs(ds: Dataset, cfg: ModelConfig, items, build_table: bool):
    """The ranking model's item features and, for the trainable text encoder, its token table."""
    m, c = ds.manifest, cfg.content
    trainable_text = uses_content(cfg) and c.source == "tower" and c.encoder_mode == "trainable"
    if trainable_text and not m.text_fields:
        # MMRec-format data ships precomputed features only: the frozen encoder reads those instead.
        features = load_item_features(ds.root)
        frozen = replace(cfg, content=replace(c, encoder_mode="frozen"))
        lacking = set(needed_modalities(frozen, build_table)) - set(features.modalities)
        raise MMRankError(
            f"{ds.root}: the trainable text encoder needs text fields; the dataset has none; use "
            f"--set model.content.encoder_mode=frozen{' ' + _modality_fix(features) if lacking else ''}"
        )
    wanted = needed_modalities(cfg, build_table)
    if wanted:
        features = load_item_features(ds.root)
        missing = [name for name in wanted if name not in features.modalities]
        if missing:
            have = sorted(features.modalities)
            raise MMRankError(
                f"{ds.root}: no {', '.join(missing)} features (have {have or 'none'}); use {_modality_fix(features)}"
            )
    tokens = None
    if trainable_text:
        from trainer.features.text import TextEncoder

        tokens = TextEncoder().tokenize_items(items, m.text_fields, c.max_text_tokens)
    return _tensors(ds, wanted), tokens


def read_config(run_dir: str | Path) -> RunConfig:
    """The config of a run folder of this format (`read_record` checks it first)."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise MMRankError(f"{run_dir}: not a run folder (no {CONFIG})")
    read_record(run_dir)
    raw = load_json(path)  # its errors name the file
    try:
        return from_dict(raw)
    except MMRankError as e:
        raise MMRankError(f"{path}: {e}") from e


def data_identity(root: str | Path) -> dict[str, str]:
    """A dataset as a run records it: its resolved folder and the SHA-256 of its manifest.json (which
    changes when the folder is rebuilt with other data: seed, counts, split boundaries)."""
    root = Path(root).resolve()
    return {"path": str(root), "manifest_sha256": hashlib.sha256((root / MANIFEST).read_bytes()).hexdigest()}


def write_record(run_dir: str | Path, data: dict[str, str]) -> None:
    """RUN/run.json: this format's version and the dataset's `data_identity`."""
    write_json_atomic(Path(run_dir) / RUN, {"format_version": FORMAT_VERSION, "data": data})


def read_record(run_dir: str | Path) -> dict:
    """RUN/run.json, refused when missing or of another format: every reader of a run folder sees one."""
    path = Path(run_dir) / RUN
    if not path.is_file():
        raise MMRankError(
            f"{run_dir}: no {RUN}, so not a run folder of format {FORMAT_VERSION} (written by an earlier "
            "version, or no run folder at all); train the run again"
        )
    record = load_json(path)  # its errors name the file
    if record.get("format_version") != FORMAT_VERSION:
        raise MMRankError(
            f"{path}: run folder format_version {record.get('format_version')!r}, this version reads "
            f"{FORMAT_VERSION}; train the run again"
        )
    return record


def recorded_data(run_dir: str | Path) -> dict[str, str]:
    """The identity (`data_identity`) of the dataset a run folder trains on."""
    return read_record(run_dir)["data"]


def describe_data(identity: dict[str, str]) -> str:
    return f"{identity['path']} (manifest sha256 {identity['manifest_sha256'][:12]})"


def data_mismatch(run_dir: str | Path, identity: dict[str, str]) -> str | None:
    """None when the dataset `identity` is the one `run_dir` recorded, else a phrase naming both:
    "trained on RECORDED, not on IDENTITY"."""
    recorded = recorded_data(run_dir)
    if recorded == identity:
        return None
    return f"trained on {describe_data(recorded)}, not on {describe_data(identity)}"


def restore(
    cfg: RunConfig, run_dir: str | Path, ds: Dataset, path: str | Path, schema: ModelSchema | None = None
) -> tuple[ModelConfig, nn.Module]:
    """A fresh model holding the weights of the checkpoint `path` (best.pt or last.pt) of `run_dir`;
    `schema` saves rebuilding it when the caller has one for the same data and content source."""
    ckpt = checkpoint.load(path)
    # best.pt records the phase of its model; last.pt's train state does.
    lora = bool(ckpt["lora_phase"] if "lora_phase" in ckpt else ckpt["state"]["lora_phase"])
    model_cfg = final_model_config(cfg, run_dir, lora)
    model = build_model(model_cfg, schema if schema is not None else build_schema(ds, model_cfg))
    if lora:
        model.start_lora_phase()
    checkpoint.load_model_state(model, ckpt["model"], path)
    model.eval()
    return model_cfg, model


def load_run(run_dir: str | Path, ds: Dataset) -> tuple[RunConfig, nn.Module]:
    """The run's config and its best model (RUN/best.pt), in eval mode on the CPU.

    The returned config's `model` is the loaded model's own config (`final_model_config`), so callers
    (evaluation, export, serving) read the history length and content source it was trained with.
    """
    cfg = read_config(run_dir)
    model_cfg, model = restore(cfg, run_dir, ds, Path(run_dir) / checkpoint.BEST)
    cfg = copy.deepcopy(cfg)
    cfg.model = model_cfg
    return cfg, model
