"""`mmrank features --data DIR`: the frozen-encoder feature cache (EM3 §3.5 feature system).

Layout of `<data>/features/` (row i = item_id i, row 0 = padding, zero and masked out):

    text.npy        float32 [n+1, K, 384]  one token per text field (manifest.text_fields, K of them)
    text_mask.npy   bool    [n+1, K]       False where the field is empty or null
    image.npy       float32 [n+1, 1, 1280]
    image_mask.npy  bool    [n+1, 1]       False where the item has no image
    hashes.parquet  item_id, text_sha256, image_sha256 ("" = no image): what each row was computed from
    meta.json       per modality: dims, settings (encoder, weights sha256, runtime, ...), last build's
                    counts and seconds; written last

A rerun reuses every row whose content hash is unchanged and recomputes the others; a change of the
encoder weights or settings (fields, token limit, preprocessing, runtime) recomputes the whole modality.
The folder is rebuilt in a temporary sibling and renamed into place, so a crash leaves the previous cache.
Datasets without text fields (or without images) have no text (image) files.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from numpy.lib.format import open_memmap
from PIL import UnidentifiedImageError
from tqdm import tqdm

from common.atomic import atomic_dir, write_json_atomic
from common.errors import DataError, MMRankError
from trainer.data.schema import ITEMS, Manifest
from trainer.data.validate import check_ids
from trainer.features import image as image_mod
from trainer.features import text as text_mod
from trainer.features.runtime import RUNTIMES, default_onnx_dir, make_runner, resolve_runtime
from trainer.features.store import CACHE_VERSION, FEATURES, META, encoder_weights_sha256

HASHES = "hashes.parquet"
IMAGE_PREPROCESS = "rgb, shorter side 224 bicubic, centre crop 224, imagenet mean/std"
# [CLS], [SEP] and one token of text; the tokenizer ignores a max_length of 0 or 1 and truncates nothing.
MIN_TEXT_TOKENS = 3


@dataclass
class FeatureConfig:
    batch_size: int = 64  # items per encoder call
    runtime: str = "auto"  # auto | onnxruntime | torch; auto = faster one measured (see runtime.py)
    max_text_tokens: int = 128  # tokens kept per text field, [CLS] and [SEP] included
    onnx_dir: Path | None = None  # exported encoder graphs; None = $MMRANK_CACHE or ~/.cache/mmrank, /onnx
    threads: int = 0  # onnxruntime intra-op threads; 0 = its default
    progress: bool = True  # tqdm bars on stderr

    def __post_init__(self):
        _check_int("--batch-size", self.batch_size, 1)
        _check_int("--max-text-tokens", self.max_text_tokens, MIN_TEXT_TOKENS, text_mod.TEXT_MAX_TOKENS)
        _check_int("threads", self.threads, 0)
        if self.runtime not in ("auto", *RUNTIMES):
            raise MMRankError(f"--runtime must be auto or one of {', '.join(RUNTIMES)}, got {self.runtime!r}")


def _check_int(option: str, value, low: int, high: int | None = None) -> None:
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < low
        or (high is not None and value > high)
    ):
        allowed = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise MMRankError(f"{option} must be an integer {allowed}, got {value!r}")


@dataclass
class ModalityReport:
    computed: int  # items whose features were (re)computed this run
    reused: int  # items copied from the previous cache
    runtime: str  # runtime that computed them ("" when nothing was computed)
    seconds: float


@dataclass
class FeatureReport:
    out: Path
    num_items: int
    seconds: float
    modalities: dict[str, ModalityReport] = field(default_factory=dict)


@dataclass
class _Modality:
    """What one modality needs: per-item content, hashes, and the settings its features depend on."""

    name: str
    tokens: int  # K
    dim: int
    settings: dict  # compared with the previous meta: any difference recomputes everything
    hashes: np.ndarray  # [n] str, row r = item r + 1; never null, so Parquet round-trips compare equal
    values: list  # [n] per item: tuple of field strings (text) or bytes / None (image)
    source: Path  # the items file, named in errors


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_items(root: Path, manifest: Manifest) -> pd.DataFrame:
    path = root / ITEMS
    columns = ["item_id", *manifest.text_fields] + (["image"] if manifest.has_images else [])
    try:
        items = pq.read_table(path, columns=columns).to_pandas()
    except (pa.ArrowInvalid, OSError, KeyError) as e:
        raise DataError(path, f"cannot read columns {columns} ({e})") from e
    n = manifest.counts["items"]
    if len(items) != n:
        raise DataError(path, f"{len(items)} rows, manifest says {n} items")
    check_ids(items["item_id"].to_numpy(), path, "item_id", 1, n, unique=True)
    return items.sort_values("item_id", kind="stable").reset_index(drop=True)


def _text_modality(items: pd.DataFrame, fields: list[str], config: FeatureConfig, source: Path) -> _Modality:
    values = [
        tuple(v if text_mod.is_text(v) else None for v in row)
        for row in zip(*(items[f] for f in fields), strict=True)
    ]
    hashes = np.array([_sha(json.dumps(v, ensure_ascii=False).encode()) for v in values], dtype=object)
    settings = {
        "encoder": text_mod.TEXT_MODEL,
        "weights_sha256": encoder_weights_sha256("text"),
        "fields": list(fields),
        "max_tokens": config.max_text_tokens,
        "pooling": "mean, l2-normalised",
        # torch and onnxruntime agree to about 1e-4, not exactly: a cache must not mix rows of both.
        "runtime": resolve_runtime(config.runtime, "text"),
    }
    return _Modality("text", len(fields), text_mod.TEXT_DIM, settings, hashes, values, source)


def _image_modality(items: pd.DataFrame, config: FeatureConfig, source: Path) -> _Modality:
    values = [None if b is None else bytes(b) for b in items["image"]]
    hashes = np.array(["" if b is None else _sha(b) for b in values], dtype=object)
    settings = {
        "encoder": image_mod.IMAGE_MODEL,
        "weights_sha256": encoder_weights_sha256("image"),
        "image_size": image_mod.IMAGE_SIZE,
        "preprocess": IMAGE_PREPROCESS,
        "runtime": resolve_runtime(config.runtime, "image"),
    }
    return _Modality("image", 1, image_mod.IMAGE_DIM, settings, hashes, values, source)


class _PreviousCache:
    """The cache on disk before this run; anything unreadable or inconsistent counts as absent."""

    def __init__(self, out: Path):
        self.out = out
        self.meta: dict = {}
        self.hashes: pd.DataFrame | None = None
        try:
            self.meta = json.loads((out / META).read_text())
            self.hashes = pq.read_table(out / HASHES).to_pandas()
        except (OSError, ValueError, pa.ArrowInvalid):
            self.meta, self.hashes = {}, None

    def modality(self, name: str) -> dict:
        return self.meta.get("modalities", {}).get(name, {})

    def reusable(self, m: _Modality) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """keep [n] bool (rows computed from the same content and settings) and the previous
        features (memory-mapped) and mask, or an all-False keep when nothing can be reused."""
        keep = np.zeros(len(m.hashes), dtype=bool)
        column = f"{m.name}_sha256"
        if (
            self.meta.get("version") != CACHE_VERSION
            or self.modality(m.name).get("settings") != m.settings
            or self.hashes is None
            or column not in self.hashes.columns
        ):
            return keep, None, None
        try:
            feats = np.load(self.out / f"{m.name}.npy", mmap_mode="r")
            mask = np.load(self.out / f"{m.name}_mask.npy")
        except (OSError, ValueError):
            return keep, None, None
        old_ids = self.hashes["item_id"].to_numpy()
        if (
            feats.shape[1:] != (m.tokens, m.dim)
            or mask.shape != feats.shape[:2]
            or old_ids.max(initial=0) >= len(feats)
        ):
            return keep, None, None
        old = dict(zip(old_ids.tolist(), self.hashes[column], strict=True))
        for row, digest in enumerate(m.hashes):
            keep[row] = old.get(row + 1, _MISSING) == digest
        return keep, feats, mask


_MISSING = object()


def build_features(data_dir: str | Path, config: FeatureConfig | None = None) -> FeatureReport:
    """Build or refresh `<data_dir>/features/`; returns what was computed and reused per modality."""
    config = config or FeatureConfig()
    start = time.perf_counter()
    root = Path(data_dir)
    manifest = Manifest.read(root)
    items = _read_items(root, manifest)
    modalities = []
    if manifest.text_fields:
        modalities.append(_text_modality(items, manifest.text_fields, config, root / ITEMS))
    if manifest.has_images:
        modalities.append(_image_modality(items, config, root / ITEMS))
    out = root / FEATURES
    previous = _PreviousCache(out)
    n = len(items)
    report = FeatureReport(out, n, 0.0)
    meta = {"version": CACHE_VERSION, "num_items": n, "modalities": {}}
    hashes = {"item_id": np.arange(1, n + 1, dtype=np.int64)}
    with atomic_dir(out, force=True) as tmp:
        for m in modalities:
            r = report.modalities[m.name] = _build_modality(m, previous, tmp, config)
            meta["modalities"][m.name] = {
                "dim": m.dim,
                "tokens": m.tokens,
                "settings": m.settings,
                "last_build": {"computed": r.computed, "reused": r.reused, "seconds": round(r.seconds, 3)},
            }
            hashes[f"{m.name}_sha256"] = m.hashes
        pq.write_table(pa.table(hashes), tmp / HASHES)
        write_json_atomic(tmp / META, meta)
    report.seconds = time.perf_counter() - start
    return report


def _build_modality(
    m: _Modality, previous: _PreviousCache, tmp: Path, config: FeatureConfig
) -> ModalityReport:
    start = time.perf_counter()
    n = len(m.hashes)
    feats = open_memmap(tmp / f"{m.name}.npy", mode="w+", dtype=np.float32, shape=(n + 1, m.tokens, m.dim))
    mask = np.zeros((n + 1, m.tokens), dtype=bool)
    keep, old_feats, old_mask = previous.reusable(m)
    if keep.any():
        rows = np.flatnonzero(keep) + 1
        feats[rows] = old_feats[rows]
        mask[rows] = old_mask[rows]
    todo = np.flatnonzero(~keep) + 1  # item ids
    runtime = ""
    if len(todo):
        runtime = m.settings["runtime"]
        encode = _encode_text if m.name == "text" else _encode_images
        encode(m, todo, feats, mask, runtime, config)
    feats.flush()
    del feats
    np.save(tmp / f"{m.name}_mask.npy", mask)
    return ModalityReport(len(todo), int(keep.sum()), runtime, time.perf_counter() - start)


def _runner(module, m: _Modality, runtime: str, config: FeatureConfig):
    onnx_dir = config.onnx_dir or default_onnx_dir()
    return make_runner(runtime, module, m.name, m.settings["weights_sha256"], onnx_dir, config.threads)


def _encode_text(
    m: _Modality, todo: np.ndarray, feats, mask: np.ndarray, runtime: str, config: FeatureConfig
):
    """Encode every non-empty field of the `todo` items, batched over texts sorted by length so a
    batch pads to similar lengths."""
    jobs = [(int(i), k, m.values[i - 1][k]) for i in todo for k in range(m.tokens) if m.values[i - 1][k]]
    if not jobs:
        return
    encoder = text_mod.TextEncoder()
    run = _runner(encoder, m, runtime, config)
    jobs.sort(key=lambda job: len(job[2]))
    with tqdm(total=len(jobs), desc="text features", unit="text", disable=not config.progress) as bar:
        for begin in range(0, len(jobs), config.batch_size):
            batch = jobs[begin : begin + config.batch_size]
            ids, attn = encoder.tokenize([t for _, _, t in batch], config.max_text_tokens)
            out = run(ids.numpy(), attn.numpy())
            for (item_id, k, _), vec in zip(batch, out, strict=True):
                feats[item_id, k] = vec
                mask[item_id, k] = True
            bar.update(len(batch))


def _encode_images(
    m: _Modality, todo: np.ndarray, feats, mask: np.ndarray, runtime: str, config: FeatureConfig
):
    ids = [int(i) for i in todo if m.values[i - 1] is not None]
    if not ids:
        return
    run = _runner(image_mod.ImageEncoder(), m, runtime, config)
    with tqdm(total=len(ids), desc="image features", unit="img", disable=not config.progress) as bar:
        for begin in range(0, len(ids), config.batch_size):
            batch = ids[begin : begin + config.batch_size]
            pixels = torch.stack([_decode(m.values[i - 1], i, m.source) for i in batch]).numpy()
            feats[batch, 0] = run(pixels)
            mask[batch, 0] = True
            bar.update(len(batch))


def _decode(blob: bytes, item_id: int, source: Path) -> torch.Tensor:
    try:
        return image_mod.load_image(blob)
    except UnidentifiedImageError as e:
        raise DataError(
            source, f"item_id {item_id}: unreadable image (unknown format)", column="image"
        ) from e
    # Decoders raise many types on hostile bytes; PIL's DecompressionBombError is a plain Exception.
    except Exception as e:
        raise DataError(
            source, f"item_id {item_id}: unreadable image ({type(e).__name__}: {e})", column="image"
        ) from e


def cli(args) -> int:
    config = FeatureConfig(
        batch_size=args.batch_size, runtime=args.runtime, max_text_tokens=args.max_text_tokens
    )
    report = build_features(args.data, config)
    for name, r in report.modalities.items():
        print(f"{name}: {r.computed} computed ({r.runtime or '-'}), {r.reused} reused, {r.seconds:.1f} s")
    if not report.modalities:
        print("no text fields and no images: nothing to encode")
    print(f"features: {report.out} ({report.num_items} items, {report.seconds:.1f} s)")
    return 0
