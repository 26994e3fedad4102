"""EM3's embedding analyses (§4.5, Tables 8 and 9), on embedding tables so that each step is testable.

(a) Material similarity of cold-start ItemID neighbours (Table 8): for a sample of cold-start items,
    the top-k neighbours by cosine in a model's ItemID-embedding space, and the mean cosine between
    the item and those neighbours in a fixed content space (the frozen encoder features). Higher means
    the ID space groups items that look alike; EM3's CIC loss should raise it over an ID-only baseline.
(b) Behavioural similarity of content neighbours (Table 9): for a sample of popular items (top 30% by
    training impressions), the top-k neighbours in a content space (the frozen features, or a model's
    content vectors `item_vectors`) and the mean cosine to them in the baseline's ItemID space, which
    only interactions trained. Higher means the content space has absorbed behaviour.

Cold start here means items whose first training impression falls in the last `recent_frac` of the
training period, EM3's "created within 5 days". Items never seen in training would not do: no model
ever updates their ID rows, so their neighbours are those of random vectors in every model.
Neighbours are searched among the items that training has seen, the query itself excluded.

Tables are [n+1, D] with row i = item i; a zero row (padding, an item without content) has cosine 0
with everything.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from common.atomic import write_json_atomic
from common.errors import MMRankError
from trainer.metrics import top_k

DEFAULT_K = 3  # EM3: top-3 neighbours
DEFAULT_SAMPLE = 2000  # EM3: "thousands" of sampled items
RECENT_FRAC = 0.2  # cold start: first seen in the last 20% of the training period
POPULAR_FRAC = 0.3  # EM3: top 30% of items


def unit_rows(table: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); zero rows stay zero."""
    table = np.asarray(table, dtype=np.float32)
    norm = np.linalg.norm(table, axis=1, keepdims=True)
    return np.divide(table, norm, out=np.zeros_like(table), where=norm > 0)


def frozen_content_space(modalities: dict[str, tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The fixed content space [n+1, sum of D] from frozen features {name: (feats [n+1, K, D], mask [n+1, K])}.

    Each modality is the masked mean of its tokens, L2-normalised; the modalities an item has are
    concatenated and scaled by 1/sqrt(their count), so the cosine of two items with every modality is
    the mean of their per-modality cosines (the modalities differ in width, 384 text vs 1280 image,
    so a plain mean of vectors is not defined) and a missing modality contributes nothing.
    """
    if not modalities:
        raise MMRankError("no frozen item features: run `mmrank features --data DIR` first")
    parts, present = [], None
    for name, (feats, mask) in sorted(modalities.items()):
        feats, mask = np.asarray(feats, dtype=np.float32), np.asarray(mask, dtype=bool)
        if feats.ndim != 3 or mask.shape != feats.shape[:2]:
            raise MMRankError(
                f"modality {name!r}: features {feats.shape} and mask {mask.shape}, expected [n+1, K, D], [n+1, K]"
            )
        if parts and parts[0].shape[0] != feats.shape[0]:
            raise MMRankError(f"modality {name!r} has {feats.shape[0]} rows, the others {parts[0].shape[0]}")
        count = mask.sum(1, keepdims=True)
        pooled = (feats * mask[..., None]).sum(1) / np.maximum(count, 1)
        parts.append(unit_rows(pooled))
        has = (count[:, 0] > 0).astype(np.float32)
        present = has if present is None else present + has
    return np.concatenate(parts, axis=1) / np.sqrt(np.maximum(present, 1.0))[:, None]


def cosine_neighbours(
    query_ids: np.ndarray, space: np.ndarray, pool_ids: np.ndarray, k: int = DEFAULT_K, chunk: int = 1024
) -> np.ndarray:
    """Ids [Q, k] of each query's k nearest pool items by cosine in `space`, nearest first, self excluded."""
    query_ids, pool_ids = np.asarray(query_ids, dtype=np.int64), np.asarray(pool_ids, dtype=np.int64)
    if len(pool_ids) <= k:
        raise MMRankError(f"neighbour pool has {len(pool_ids)} items; need more than k={k}")
    unit = unit_rows(space)
    pool = unit[pool_ids]
    out = np.empty((len(query_ids), k), dtype=np.int64)
    for start in range(0, len(query_ids), chunk):
        q = query_ids[start : start + chunk]
        sims = unit[q] @ pool.T
        sims[pool_ids[None, :] == q[:, None]] = -np.inf
        out[start : start + chunk] = pool_ids[top_k(sims, k)]
    return out


def mean_cosine(query_ids: np.ndarray, neighbour_ids: np.ndarray, space: np.ndarray) -> np.ndarray:
    """[Q] mean cosine in `space` between each query and its neighbours [Q, k]."""
    unit = unit_rows(space)
    return np.einsum("qd,qkd->qk", unit[query_ids], unit[neighbour_ids]).mean(axis=1).astype(np.float64)


def neighbour_similarity(
    query_ids: np.ndarray,
    search_space: np.ndarray,
    measure_space: np.ndarray,
    pool_ids: np.ndarray,
    k: int = DEFAULT_K,
) -> np.ndarray:
    """[Q]: neighbours found in `search_space`, similarity measured in `measure_space`."""
    if search_space.shape[0] != measure_space.shape[0]:
        raise MMRankError(
            f"search space has {search_space.shape[0]} rows, measure space {measure_space.shape[0]}"
        )
    return mean_cosine(query_ids, cosine_neighbours(query_ids, search_space, pool_ids, k), measure_space)


def recent_items(item_id: np.ndarray, ts: np.ndarray, recent_frac: float = RECENT_FRAC) -> np.ndarray:
    """Items (of these training events) whose first impression is in the last `recent_frac` of the period."""
    item_id, ts = np.asarray(item_id, dtype=np.int64), np.asarray(ts, dtype=np.int64)
    if item_id.size == 0:
        return item_id
    first = np.full(int(item_id.max()) + 1, np.iinfo(np.int64).max)
    np.minimum.at(first, item_id, ts)
    t0, t1 = int(ts.min()), int(ts.max())
    cutoff = t1 - recent_frac * (t1 - t0)
    seen = np.unique(item_id)
    return seen[first[seen] >= cutoff]


def popular_items(item_id: np.ndarray, top_frac: float = POPULAR_FRAC) -> np.ndarray:
    """The top `top_frac` of items by impressions (ties broken by id), ids sorted."""
    counts = np.bincount(np.asarray(item_id, dtype=np.int64))
    seen = np.flatnonzero(counts)
    ranked = seen[np.lexsort((seen, -counts[seen]))]
    return np.sort(ranked[: math.ceil(top_frac * len(seen))])


def sample_ids(ids: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """At most n of the ids, drawn without replacement by seed, sorted."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) <= n:
        return np.sort(ids)
    return np.sort(np.random.default_rng(seed).choice(ids, n, replace=False))


def _summary(values: np.ndarray, reference: float | None) -> dict:
    mean = float(values.mean())
    gain = (mean - reference) / abs(reference) if reference is not None and reference != 0 else None
    return {"mean": mean, "std": float(values.std()), "gain": gain}


def analysis_report(
    id_tables: dict[str, np.ndarray],
    content_tables: dict[str, np.ndarray],
    frozen: np.ndarray,
    cold_items: np.ndarray,
    popular: np.ndarray,
    pool: np.ndarray,
    baseline: str,
    k: int = DEFAULT_K,
) -> dict:
    """Both analyses. id_tables: model -> ItemID embeddings (the baseline's among them);
    content_tables: model -> content vectors; frozen: the fixed content space; gains are relative to
    the baseline (Table 8) and to the frozen features (Table 9)."""
    if baseline not in id_tables:
        raise MMRankError(
            f"baseline {baseline!r} has no ItemID embeddings (models with them: {sorted(id_tables)})"
        )
    if len(cold_items) == 0 or len(popular) == 0:
        raise MMRankError(
            f"nothing to analyse: {len(cold_items)} cold-start and {len(popular)} popular items"
        )
    material = {
        name: neighbour_similarity(cold_items, table, frozen, pool, k) for name, table in id_tables.items()
    }
    base = float(material[baseline].mean())
    spaces = {"frozen": frozen, **content_tables}
    behaviour = {
        name: neighbour_similarity(popular, table, id_tables[baseline], pool, k)
        for name, table in spaces.items()
    }
    frozen_mean = float(behaviour["frozen"].mean())
    return {
        "k": k,
        "baseline": baseline,
        "material_similarity": {
            "items": int(len(cold_items)),
            "searched_in": "ItemID embeddings of each model",
            "measured_in": "frozen encoder features",
            "models": {name: _summary(v, None if name == baseline else base) for name, v in material.items()},
        },
        "behavioural_similarity": {
            "items": int(len(popular)),
            "searched_in": "content space of each model (frozen: the frozen encoder features)",
            "measured_in": f"ItemID embeddings of {baseline}",
            "models": {
                name: _summary(v, None if name == "frozen" else frozen_mean) for name, v in behaviour.items()
            },
        },
    }


def _table(models: dict, column: str) -> list[str]:
    lines = [f"| model | {column} | std | gain |", "|---|---|---|---|"]
    for name, s in models.items():
        gain = "-" if s["gain"] is None else f"{100 * s['gain']:+.3f}%"
        lines.append(f"| {name} | {s['mean']:.4f} | {s['std']:.4f} | {gain} |")
    return lines


def report_markdown(report: dict) -> str:
    m, b, k = report["material_similarity"], report["behavioural_similarity"], report["k"]
    lines = [
        "# Embedding analyses (EM3 §4.5)",
        "",
        "## Material similarity of cold-start ItemID neighbours (EM3 Table 8)",
        "",
        f"{m['items']} cold-start items; top-{k} neighbours in the {m['searched_in']}; "
        f"mean cosine in the {m['measured_in']}; gain relative to {report['baseline']}.",
        "",
        *_table(m["models"], "material similarity"),
        "",
        "## Behavioural similarity of content neighbours (EM3 Table 9)",
        "",
        f"{b['items']} popular items; top-{k} neighbours in the {b['searched_in']}; "
        f"mean cosine in the {b['measured_in']}; gain relative to frozen.",
        "",
        *_table(b["models"], "behavioural similarity"),
        "",
    ]
    return "\n".join(lines)


def write_report(report: dict, out: str | Path) -> None:
    """OUT/analysis.json and OUT/analysis.md, each written to a temporary file and renamed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "analysis.json", report)
    tmp = out / ".analysis.md.tmp"
    tmp.write_text(report_markdown(report))
    os.replace(tmp, out / "analysis.md")


def item_id_table(model: torch.nn.Module) -> np.ndarray | None:
    """RankingModel's ItemID embeddings [n+1, e] (`model.ranker.item_emb`), None for a model without."""
    emb = getattr(getattr(model, "ranker", None), "item_emb", None)
    return None if emb is None else emb.weight.detach().float().cpu().numpy()


def run_analysis(
    run_dirs: list[str],
    data_dir: str,
    out: str,
    sample: int = DEFAULT_SAMPLE,
    k: int = DEFAULT_K,
    seed: int = 0,
) -> dict:
    """Both analyses over trained runs; the first run is the baseline (an ID-only ranker).

    Writes OUT/analysis.json and OUT/analysis.md and returns the report.
    """
    from trainer.data.schema import load_dataset
    from trainer.evaluate import has_content, inference, item_vectors
    from trainer.features.store import load_item_features
    from trainer.run import load_run

    if not run_dirs:
        raise MMRankError("run_analysis needs at least one run folder (the first is the baseline)")
    ds = load_dataset(data_dir)
    frozen = frozen_content_space(load_item_features(data_dir).modalities)
    train = ds.split("train")
    items, ts = train["item_id"].to_numpy(), train["ts"].to_numpy()
    names = _run_names(run_dirs)
    id_tables, content_tables = {}, {}
    for name, run_dir in zip(names, run_dirs, strict=True):
        _, model = load_run(run_dir, ds)
        table = item_id_table(model)
        if table is not None:
            id_tables[name] = table
        if has_content(model) and name != names[0]:
            with inference(model):
                content_tables[name] = item_vectors(model, ds.num_items).float().cpu().numpy()
    report = analysis_report(
        id_tables,
        content_tables,
        frozen,
        sample_ids(recent_items(items, ts), sample, seed),
        sample_ids(popular_items(items), sample, seed),
        np.unique(items),
        names[0],
        k,
    )
    report["runs"] = dict(zip(names, map(str, run_dirs), strict=True))
    write_report(report, out)
    return report


def cli(args) -> int:
    """`mmrank analyze`: both analyses over trained runs, the first one the ID-only baseline."""
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    report = run_analysis(runs, args.data, args.out, args.sample, args.k, args.seed)
    print(report_markdown(report))
    print(f"analyze: wrote {Path(args.out) / 'analysis.md'} and analysis.json")
    return 0


def _run_names(run_dirs: list[str]) -> list[str]:
    """Folder names, or full paths where two runs share a folder name."""
    base = [Path(r).name for r in run_dirs]
    return [b if base.count(b) == 1 else str(r) for b, r in zip(base, run_dirs, strict=True)]


def neighbour_similarity_reference(
    query_ids, search_space, measure_space, pool_ids, k: int = DEFAULT_K
) -> np.ndarray:
    """One query at a time, float64, full sort of the pool: the plain version of `neighbour_similarity`."""

    def cos(a, b):
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))

    search = np.asarray(search_space, dtype=np.float64)
    measure = np.asarray(measure_space, dtype=np.float64)
    out = []
    for q in query_ids:
        candidates = [p for p in pool_ids if p != q]
        sims = [cos(search[q], search[p]) for p in candidates]
        nearest = [candidates[i] for i in np.argsort(-np.array(sims), kind="stable")[:k]]
        out.append(np.mean([cos(measure[q], measure[p]) for p in nearest]))
    return np.array(out)
