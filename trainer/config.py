"""Run configuration: what to train (ModelConfig) and how (TrainConfig), resolved from presets and overrides.

Resolution order, each step overriding the one before:
1. the dataclass defaults below and in `trainer.model.config`;
2. a preset (`trainer/presets/NAME.json`: {"description", "paper", "base"?, "overrides": {dotted: value}}),
   after its `base` preset, recursively;
3. a config file (`--config`): nested JSON shaped like a run's config.json, complete or partial; a
   "preset" key in it applies that preset first, so `--config RUN/config.json` reproduces a run;
4. `--set key=value` overrides (dotted paths; the value is parsed as JSON, else taken as a string);
5. the explicit CLI flags `--seed`, `--epochs`, `--max-steps`.

Every key is checked against the dataclasses: an unknown key or a value of the wrong type is a
MMRankError naming the key. The resolved config is written to RUN/config.json in full.
"""

from __future__ import annotations

import copy
import json
import types
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

from common.errors import MMRankError
from trainer.model.config import ModelConfig

PRESETS_DIR = Path(__file__).parent / "presets"
AMP_MODES = ("auto", "off", "bf16", "fp16")
MAIN_LOSSES = ("bce", "bpr", "none")
STAGE1_LOSSES = ("same", "none")
# Early-stopping metrics and whether larger is better; recall@K / ndcg@K on data with a top-K protocol.
STOP_METRICS = {"auc": True, "gauc": True, "gauc_request": True, "cold_auc": True, "logloss": False}
TOPK_METRICS = ("recall@", "ndcg@")
# "auto" follows the dataset's protocol: top-K data (MMRec) has no negatives in valid/test, so AUC is
# null there and recall@20 (MMRec's own early-stopping metric) is used instead.
AUTO_STOP = {False: "auc", True: "recall@20"}


def _at_least(low: int) -> tuple[str, Callable[[float], bool]]:
    return f">= {low}", lambda v: v >= low


POSITIVE = ("> 0", lambda v: v > 0)
FRACTION = ("in [0, 1)", lambda v: 0 <= v < 1)
# model.KEY -> (allowed range, test). Outside them a value fails deep inside the model (a reshape, an
# unflatten, a zero-width layer) or not at all (a NaN loss, a loss weight that rewards the loss), so
# they are checked with the config. Comparisons are written so that NaN fails them.
MODEL_RANGES = {
    "content.d": _at_least(1),
    "content.num_queries": _at_least(1),
    "content.fusion_layers": _at_least(1),
    "content.fusion_heads": _at_least(1),
    "content.fusion_ffn": _at_least(0),
    "content.dropout": FRACTION,
    "content.encoder_lora_rank": _at_least(0),
    "content.max_text_tokens": _at_least(1),
    "interest.short_len": _at_least(1),
    "interest.long_len": _at_least(0),
    "interest.attention_heads": _at_least(1),
    "interest.decoder_layers": _at_least(0),
    "interest.decoder_queries": _at_least(1),
    "interest.decoder_heads": _at_least(1),
    "interest.similarity_topk": _at_least(0),
    "interest.lora_rank": _at_least(0),
    "ranker.id_dim": _at_least(1),
    "ranker.token_dim": _at_least(1),
    "ranker.mixer_layers": _at_least(0),
    "ranker.dropout": FRACTION,
    "loss.cic_alpha": _at_least(0),
    "loss.cic_tau": POSITIVE,
    "loss.cic_dim": _at_least(1),
    "loss.sqdc_lambda": _at_least(0),
    "loss.sqdc_scale": POSITIVE,
    "loss.cic_negatives": _at_least(0),
    "loss.l2_weight": _at_least(0),
    "graph.dim": _at_least(1),
    "graph.ui_layers": _at_least(0),
    "graph.item_layers": _at_least(0),
    "graph.knn_k": _at_least(1),
    "graph.image_weight": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "graph.edge_dropout": FRACTION,
    "graph.feature_bpr_weight": _at_least(0),
}
# Heads split content vectors of width model.content.d into equal slices.
HEAD_COUNTS = ("content.fusion_heads", "interest.attention_heads", "interest.decoder_heads")


def stop_metric(metric: str, topk_protocol: bool) -> str:
    """The early-stopping metric a run uses on data with (or without) a top-K protocol."""
    return AUTO_STOP[topk_protocol] if metric == "auto" else metric


def higher_is_better(metric: str) -> bool | None:
    """Direction of an early-stopping metric; None for a name that is not one."""
    if metric in STOP_METRICS:
        return STOP_METRICS[metric]
    prefix, _, k = metric.partition("@")
    return True if f"{prefix}@" in TOPK_METRICS and k.isdigit() else None


@dataclass
class TrainConfig:
    """How to train. Steps are optimizer steps; one step consumes `batch_size` rows per process."""

    batch_size: int = 256
    epochs: int = 2  # epochs of the (first) training phase
    max_steps: int = 0  # stop after this many optimizer steps in total (0 = no limit)
    lr_content: float = 1e-3  # AdamW lr of the content tower (projections, fusion, trainable encoder)
    lr_ranker: float = 2e-3  # AdamW lr of everything else (ID embeddings, interest, ranker, loss heads)
    weight_decay: float = 1e-5
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    amp: str = "auto"  # auto: bf16 (or fp16 + loss scaling) autocast on CUDA, off on CPU | off | bf16 | fp16
    shuffle: bool = True  # shuffle rows per epoch (order is a pure function of seed and epoch)
    eval_every_steps: int = 0  # validate every N steps; 0 = at the end of every epoch
    eval_batch_size: int = 1024
    # auto (auc; recall@20 on top-K data) | auc | gauc | gauc_request | cold_auc | recall@K | ndcg@K |
    # logloss (lower is better). A validation where the metric is null (e.g. auc without negatives) fails.
    early_stop_metric: str = "auto"
    # stop after this many validations without improvement; 0 = never stop early. An early stop in phase 1
    # of a LoRA schedule ends that phase: the LoRA phase starts from its best weights, with its own patience.
    patience: int = 3
    log_every: int = 50  # a structured line in RUN/train_log.jsonl every N steps
    checkpoint_every_steps: int = 200  # RUN/last.pt every N steps (and at every epoch end)
    # Recall@K / NDCG@K cut-offs on data with a top-K protocol; they include a recall@K / ndcg@K early-stop K
    topk: tuple[int, ...] = (10, 20, 50)
    # Streaming (online learning): one pass in time order over train + valid + test, each window
    # evaluated before the model trains on it (prequential evaluation).
    streaming: bool = False
    stream_windows: int = 4  # windows the train split is cut into (valid and test are one window each)
    # EM3 §3.3.2 LoRA schedule: phase 1 trains everything for `epochs` with model.interest.short_len;
    # phase 2 calls model.start_lora_phase() (freeze W, add LoRA) and trains `lora_epochs` more with
    # histories of `lora_history_len` items.
    lora_epochs: int = 0  # 0 = no LoRA phase
    lora_history_len: int = 50
    # EM3 §4.3.6 task-specific PE (and LEMUR Table 3 two-stage): stage 1 trains the model end to end
    # for `task_pe_epochs`, its content tower fills a per-item table, stage 2 trains a fresh model on
    # that fixed table with everything else in this config.
    task_pe: bool = False
    task_pe_epochs: int = 1
    # model.loss.main of stage 1: same (as this config) | none (the auxiliary losses alone: LEMUR's
    # two-stage baseline pretrains the encoder with SQDC only)
    task_pe_stage1_loss: str = "same"
    num_workers: int = 0  # DataLoader worker processes building batches; 0 = in the training process
    ddp_find_unused_parameters: bool = True  # LEMUR's p/q sampling leaves parameters unused on some steps


@dataclass
class RunConfig:
    preset: str | None = None
    description: str = ""
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def from_dict(raw: dict) -> RunConfig:
    """A RunConfig from a nested dict (as in config.json); checks every key and value type."""
    return _build(RunConfig, raw, "")


def load_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MMRankError(f"{path}: config file not found")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MMRankError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise MMRankError(f"{path}: expected a JSON object")
    return raw


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def read_preset(name: str) -> dict:
    """The raw preset file: description, paper, optional base, overrides."""
    path = PRESETS_DIR / f"{name}.json"
    if not path.is_file():
        raise MMRankError(f"unknown preset {name!r} (known: {', '.join(list_presets())})")
    raw = load_json(path)
    unknown = set(raw) - {"description", "paper", "base", "overrides"}
    if unknown:
        raise MMRankError(f"{path}: unknown preset fields {sorted(unknown)}")
    return raw


def preset_overrides(name: str, _seen: tuple[str, ...] = ()) -> dict[str, object]:
    """The dotted overrides of a preset, its base chain applied first (base first, then this preset)."""
    if name in _seen:
        raise MMRankError(f"preset {name!r}: cyclic base chain {' -> '.join((*_seen, name))}")
    raw = read_preset(name)
    merged = preset_overrides(raw["base"], (*_seen, name)) if raw.get("base") else {}
    merged.update(raw.get("overrides", {}))
    return merged


def parse_sets(items: list[str]) -> dict[str, object]:
    """["a.b=1", "c=text,image"] -> {"a.b": 1, "c": "text,image"}: JSON values, else plain strings."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MMRankError(f"--set {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def apply_overrides(tree: dict, overrides: dict[str, object], source: str) -> dict:
    """Set dotted keys in a nested dict shaped like RunConfig.to_dict(); unknown paths are errors."""
    tree = copy.deepcopy(tree)
    for key, value in overrides.items():
        node, parts = tree, key.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                raise MMRankError(f"{source}: unknown config key {'.'.join(parts[: depth + 1])!r}")
            if depth == len(parts) - 1:
                if isinstance(node[part], dict):
                    raise MMRankError(f"{source}: {key!r} is a section; set one of its fields")
                node[part] = value
            else:
                node = node[part]
    return tree


def merge(tree: dict, patch: dict, source: str, prefix: str = "") -> dict:
    """Recursively merge a nested (possibly partial) dict into `tree`; unknown keys are errors."""
    tree = copy.deepcopy(tree)
    for key, value in patch.items():
        path = f"{prefix}{key}"
        if key not in tree:
            raise MMRankError(f"{source}: unknown config key {path!r}")
        if isinstance(tree[key], dict):
            if not isinstance(value, dict):
                raise MMRankError(f"{source}: {path!r} must be an object")
            tree[key] = merge(tree[key], value, source, f"{path}.")
        else:
            tree[key] = value
    return tree


def resolve(
    preset: str | None = None,
    config_file: str | Path | None = None,
    sets: dict[str, object] | None = None,
    seed: int | None = None,
    epochs: int | None = None,
    max_steps: int | None = None,
) -> RunConfig:
    tree = RunConfig().to_dict()
    file_patch = load_json(config_file) if config_file is not None else {}
    preset = preset if preset is not None else file_patch.get("preset")
    if preset is not None:
        tree = apply_overrides(tree, preset_overrides(preset), f"preset {preset}")
        tree["preset"] = preset
        tree["description"] = read_preset(preset).get("description", "")
    if config_file is not None:
        tree = merge(tree, file_patch, str(config_file))
    tree = apply_overrides(tree, sets or {}, "--set")
    flags = {"seed": seed, "train.epochs": epochs, "train.max_steps": max_steps}
    tree = apply_overrides(tree, {k: v for k, v in flags.items() if v is not None}, "flag")
    return from_dict(tree)


def _field(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def check_model_ranges(model: ModelConfig) -> None:
    """Numeric model fields in their ranges (MODEL_RANGES), every head count dividing content.d."""
    for key, (allowed, ok) in MODEL_RANGES.items():
        value = _field(model, key)
        if not ok(value):
            raise MMRankError(f"model.{key} must be {allowed}, got {value!r}")
    for width in model.ranker.hidden:
        if not width >= 1:
            raise MMRankError(
                f"model.ranker.hidden: every width must be >= 1, got {list(model.ranker.hidden)}"
            )
    for key in HEAD_COUNTS:
        heads = _field(model, key)
        if model.content.d % heads:
            raise MMRankError(f"model.{key}={heads} must divide model.content.d={model.content.d}")


def check_stop_metric(t: TrainConfig, topk_protocol: bool | None) -> None:
    """A known early-stopping metric; a recall@K / ndcg@K one (what `auto` resolves to, where the data is
    known) needs top-K data and K among train.topk: no other cut-off is computed, so its value would be null."""
    if t.early_stop_metric != "auto" and higher_is_better(t.early_stop_metric) is None:
        raise MMRankError(
            f"train.early_stop_metric: {t.early_stop_metric!r} is not one of auto, {', '.join(STOP_METRICS)}, recall@K, ndcg@K"
        )
    if topk_protocol is None and t.early_stop_metric == "auto":
        return
    name = t.early_stop_metric if topk_protocol is None else stop_metric(t.early_stop_metric, topk_protocol)
    if not name.startswith(TOPK_METRICS):
        return
    shown = f"train.early_stop_metric={t.early_stop_metric!r}" + (
        f" ({name} on this data)" if name != t.early_stop_metric else ""
    )
    if topk_protocol is False:
        raise MMRankError(f"{shown} needs data with a top-K protocol")
    k = int(name.partition("@")[2])
    if k not in t.topk:
        raise MMRankError(f"{shown} needs {k} in train.topk, got {list(t.topk)}")


def check_graph_model(cfg: RunConfig) -> None:
    """A two-tower graph model trains with BPR in plain epochs: no LoRA phase, task PE or streaming."""
    g, t = cfg.model.graph, cfg.train
    if g.model == "none":
        return
    if cfg.model.loss.main != "bpr":
        raise MMRankError(
            f"model.graph.model={g.model!r} trains with model.loss.main='bpr', got {cfg.model.loss.main!r}"
        )
    for name in ("lora_epochs", "task_pe", "streaming"):
        if getattr(t, name):
            raise MMRankError(
                f"model.graph.model={g.model!r} has no train.{name} schedule; set it to 0/false"
            )


def validate(cfg: RunConfig, topk_protocol: bool | None = None) -> None:
    """Value checks the types cannot express; the model checks its option names and combinations.
    `topk_protocol`: whether the data has a top-K protocol, where known (it resolves early_stop_metric=auto)."""
    check_model_ranges(cfg.model)
    # NumPy's per-epoch generators refuse a negative seed; torch's refuses one of 2**64 or more.
    if not 0 <= cfg.seed < 2**63:
        raise MMRankError(f"seed must be in [0, 2**63), got {cfg.seed}")
    t = cfg.train
    if cfg.model.loss.main not in MAIN_LOSSES:
        raise MMRankError(f"model.loss.main: {cfg.model.loss.main!r} is not one of {', '.join(MAIN_LOSSES)}")
    if cfg.model.loss.main == "none" and not (cfg.model.loss.sqdc_lambda > 0 or cfg.model.loss.cic_alpha > 0):
        raise MMRankError(
            "model.loss.main='none' needs an auxiliary loss (loss.sqdc_lambda or loss.cic_alpha > 0)"
        )
    if t.task_pe_stage1_loss not in STAGE1_LOSSES:
        raise MMRankError(
            f"train.task_pe_stage1_loss: {t.task_pe_stage1_loss!r} is not one of {', '.join(STAGE1_LOSSES)}"
        )
    if t.amp not in AMP_MODES:
        raise MMRankError(f"train.amp: {t.amp!r} is not one of {', '.join(AMP_MODES)}")
    positive = {
        "batch_size": t.batch_size,
        "eval_batch_size": t.eval_batch_size,
        "log_every": t.log_every,
        "checkpoint_every_steps": t.checkpoint_every_steps,
        "stream_windows": t.stream_windows,
        "lora_history_len": t.lora_history_len,
        "task_pe_epochs": t.task_pe_epochs,
    }
    nonneg = {
        "epochs": t.epochs,
        "max_steps": t.max_steps,
        "eval_every_steps": t.eval_every_steps,
        "patience": t.patience,
        "lora_epochs": t.lora_epochs,
        "num_workers": t.num_workers,
        "grad_clip": t.grad_clip,
        "weight_decay": t.weight_decay,
        "lr_content": t.lr_content,
        "lr_ranker": t.lr_ranker,
    }
    for name, value in positive.items():
        if not value > 0:
            raise MMRankError(f"train.{name} must be positive, got {value}")
    for name, value in nonneg.items():
        if not value >= 0:
            raise MMRankError(f"train.{name} must be >= 0, got {value}")
    if not t.topk:
        raise MMRankError("train.topk: needs at least one cut-off")
    if not all(k >= 1 for k in t.topk):
        raise MMRankError(f"train.topk: every cut-off must be >= 1, got {list(t.topk)}")
    check_stop_metric(t, topk_protocol)
    check_graph_model(cfg)
    if t.lora_epochs and cfg.model.interest.lora_rank <= 0:
        raise MMRankError("train.lora_epochs > 0 needs model.interest.lora_rank > 0")
    if t.lora_epochs and (t.task_pe or cfg.model.content.source == "fixed"):
        raise MMRankError("train.lora_epochs: a fixed content table (pe, task_pe) has no weights to adapt")
    if t.streaming and (t.task_pe or t.lora_epochs):
        raise MMRankError(
            "train.streaming is one time-ordered pass: it cannot be combined with task_pe or lora_epochs"
        )


def _build(cls, raw, path: str):
    if not isinstance(raw, dict):
        raise MMRankError(f"config key {path or 'root'!r} must be an object, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise MMRankError(f"unknown config key {path + unknown[0]!r}")
    kwargs = {name: _coerce(hints[name], value, f"{path}{name}") for name, value in raw.items()}
    return cls(**kwargs)


def _coerce(tp, value, path: str):
    """Check (and where lossless, convert) one value against its annotated type."""
    if is_dataclass(tp):
        return _build(tp, value, f"{path}.")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise MMRankError(f"config key {path!r}: expected a list, got {value!r}")
        return tuple(_coerce(args[0], v, path) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise MMRankError(f"config key {path!r}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
