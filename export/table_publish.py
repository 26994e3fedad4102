"""`mmrank table publish --repo REPO (--export DIR | --items FILE)`: the next item table version of a live
repository, for every backend.

The new table is the export's (`mmrank export` of the served model: its checkpoint must be the one the
served table came from, since the ranking graph in the repository reads that model's item tokens) or
the served table with an item set added: FILE is a .npz with `ids` [M] int64 and `content` [M, d]
float32, e.g. vectors from the `encode_items` endpoint; new items get the unknown item token, known ids
their content replaced (ItemTable.with_items). A two-tower model with an item-item graph (FREEDOM, EM3 on
FREEDOM) has no content column: FILE holds the items' raw features by modality instead (`text_feat`
[M, D_t], `image_feat` [M, D_v], ...: the names of the model's features) and each item's row is placed
through the kNN graph (model_repository/item_placement.py); a model with neither (LightGCN, BPR-MF, the
ID-only ranker) cannot take new items: their ids stay unknown and rank last. export/repository.py `add_table_version` checks it
(finite values, the served widths; a native version's graph is built, loaded in onnxruntime and must
answer a probe request like the numpy lookup and the ranking graph), writes it into a hidden folder,
syncs it and renames it into place, so a server sees whole, valid versions only. A server in poll mode
loads it within its poll interval; with `--url` the command also asks a server in explicit mode to load
it, and waits until `rank` answers with the new item_table_version.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from common.errors import MMRankError
from export.lookup_graph import TABLE_DIR
from export.repository import add_table_version, config_widths, read_config
from model_repository import item_table as it
from model_repository.item_placement import ItemPlacement

WAIT_S = 120.0  # --url: how long to wait for the server to answer with the new version


def served_table(repo: Path) -> tuple[it.ItemTable, int]:
    """The table the repository's item_lookup serves (its newest valid version) and that version."""
    model = Path(repo) / "item_lookup"
    versions = it.table_versions(model) if model.is_dir() else []
    if not versions:
        raise MMRankError(f"{repo}: no item_lookup model folder (render one with `mmrank repo`)")
    table, version, _ = it.newest_valid_table(model, versions[-1], *config_widths(read_config(model)))
    return table, version


def table_from_export(export: Path, served: it.ItemTable) -> it.ItemTable:
    """The export's item table, refused where it comes from another checkpoint than the served one."""
    table = it.ItemTable.read(Path(export) / "item_table")
    have = (table.source or {}).get("checkpoint_sha256")
    want = (served.source or {}).get("checkpoint_sha256")
    if have != want:
        raise MMRankError(
            f"{export}: the export is of checkpoint {str(have)[:12]}, the served table of {str(want)[:12]}: "
            "a new model needs a new repository (`mmrank repo`), a table version only a new table"
        )
    return table


def table_with_items(items: Path, served: it.ItemTable, table_dir: Path) -> it.ItemTable:
    """The served table (read from `table_dir`) with the item set in `items` added: .npz with ids [M] and
    content [M, d], or the items' features by modality for a table placed through an item graph."""
    try:
        with np.load(items, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError) as e:
        raise MMRankError(f"{items}: not an item set (a .npz with `ids` and `content`: {e})") from e
    ids = arrays.get("ids")
    if ids is None or ids.ndim != 1:
        raise MMRankError(f"{items}: not an item set: `ids` must be a [M] array")
    version = served.version + 1
    if served.content is not None:
        content = arrays.get("content")
        if content is None or content.shape != (len(ids), served.d):
            shape = None if content is None else content.shape
            raise MMRankError(f"{items}: ids {ids.shape} and content {shape} must be [M] and [M, {served.d}]")
        return served.with_items(ids, content, version)
    placement = ItemPlacement.read(table_dir)
    if placement is None:
        raise MMRankError(
            f"{items}: the served model scores items by what it learned of their ids (no content vectors, "
            "no item graph): it cannot place new items, whose ids stay unknown and rank last"
        )
    missing = sorted(set(placement.weights) - set(arrays))
    if missing:
        raise MMRankError(
            f"{items}: the served model places new items by their {', '.join(sorted(placement.weights))} "
            f"features; the item set lacks {', '.join(missing)}"
        )
    rows = placement.place({name: arrays[name] for name in placement.weights})
    return served.with_items(ids, None, version, item_rows=rows)


def wait_served(url: str, version: int, probe_id: int, wait_s: float = WAIT_S) -> None:
    """Ask the server at `url` to load item_lookup (explicit mode; poll mode loads it itself) and wait
    until `rank` answers with `version`; MMRankError after `wait_s`."""
    import tritonclient.grpc as grpc

    client = grpc.InferenceServerClient(url)
    try:
        client.load_model("item_lookup")
    except grpc.InferenceServerException as e:
        if "polling is enabled" not in str(e):  # poll mode: the server loads new versions by itself
            raise MMRankError(f"{url}: the server cannot load item_lookup version {version}: {e}") from e
    inputs = []
    for name, ids in ((it.HISTORY_IDS, [[it.PAD_ID]]), (it.CANDIDATE_IDS, [[probe_id]])):
        inputs.append(grpc.InferInput(name, [1, 1], "INT64"))
        inputs[-1].set_data_from_numpy(np.array(ids, np.int64))
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        answer = client.infer("rank", inputs, client_timeout=30).as_numpy(it.TABLE_VERSION)
        if int(answer.reshape(-1)[0]) == version:
            return
        time.sleep(0.5)
    raise MMRankError(f"{url}: rank does not answer with item table version {version} after {wait_s:.0f} s")


def publish(repo: Path, export: Path | None = None, items: Path | None = None) -> Path:
    """Publish the next table version from an export or an item set; the new version's folder."""
    served, version = served_table(repo)
    table_dir = Path(repo) / "item_lookup" / str(version) / TABLE_DIR
    table = table_from_export(export, served) if export else table_with_items(items, served, table_dir)
    return add_table_version(repo, table)


def cli(args) -> int:
    repo = Path(args.repo)
    folder = publish(
        repo, Path(args.export) if args.export else None, Path(args.items) if args.items else None
    )
    table = it.ItemTable.read(folder / "item_table")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20
    print(
        f"table: published item_lookup version {folder.name} ({len(table.ids) - 1} items, {size:.1f} MiB) in {repo}"
    )
    if args.url:
        wait_served(args.url, int(folder.name), int(table.ids[-1]), args.wait)
        print(f"table: {args.url} answers with item table version {folder.name}")
    return 0
