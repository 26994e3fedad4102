"""`mmrank table publish --repo REPO (--export DIR | --items FILE)`: the next item table version of a live
repository, for every backend.

The new table is the export's (`mmrank export` of the served model: its checkpoint must be the one the
served table came from, since the ranking graph in the repository reads that model's item tokens) or
the served table with an item set added: FILE is a .npz with integer `ids` [M] and float `content`
[M, d], e.g. vectors from the `encode_items` endpoint (anything else is refused, naming the problem);
new items get the unknown item token, known ids their content replaced (ItemTable.with_items). A
two-tower model with an item-item graph (FREEDOM, EM3 on FREEDOM) has no content column: FILE holds the
items' raw features by modality instead (`text_feat` [M, D_t], `image_feat` [M, D_v], ...: the names of
the model's features) and each item's row is placed through the kNN graph
(model_repository/item_placement.py); a model with neither (LightGCN, BPR-MF, the ID-only ranker)
cannot take new items: their ids stay unknown and rank last. export/repository.py `add_table_version` checks it
(finite values, the served widths; a native version's graph is built, loaded in onnxruntime and must
answer a probe request like the numpy lookup and the ranking graph), writes it into a hidden folder,
syncs it and renames it into place, so a server sees whole, valid versions only. A server in poll mode
loads it within its poll interval; with `--url` the command also asks a server in explicit mode to load
it, and waits until `rank` answers with the new item_table_version.
"""

from __future__ import annotations

import time
import zipfile
from pathlib import Path

import numpy as np

from common.errors import MMRankError
from export.lookup_graph import TABLE_DIR
from export.repository import ServedTable, add_table_version, served_table
from model_repository import item_table as it
from model_repository.item_placement import ItemPlacement

ITEM_SET = (
    "a .npz with integer `ids` [M] and float `content` [M, d] (a model that places items through its item "
    "graph: their features by modality instead of content)"
)


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


def load_item_set(items: Path) -> dict[str, np.ndarray]:
    """The arrays of the item set file `items` by name, with integer `ids` [M]; MMRankError naming the
    file and the problem for anything else (a .npy, a cut archive, float ids)."""
    try:
        data = np.load(items, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise MMRankError(f"{items}: not an item set, {ITEM_SET} ({type(e).__name__}: {e})") from e
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise MMRankError(f"{items}: a single array, not an item set: {ITEM_SET}")
    with data:
        try:
            arrays = {name: data[name] for name in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise MMRankError(f"{items}: not an item set, {ITEM_SET} ({type(e).__name__}: {e})") from e
    ids = arrays.get("ids")
    if ids is None or ids.dtype.kind not in "iu" or ids.ndim != 1:
        have = "none" if ids is None else f"{ids.dtype} {ids.shape}"
        raise MMRankError(f"{items}: ids are {have}: {ITEM_SET}")
    if ids.dtype.kind == "u" and ids.size and ids.max() > np.iinfo(np.int64).max:
        raise MMRankError(f"{items}: ids over {np.iinfo(np.int64).max}: item ids are int64")
    arrays["ids"] = ids.astype(np.int64)
    return arrays


def item_content(items: Path, arrays: dict[str, np.ndarray], d: int) -> np.ndarray:
    """The set's float `content` [M, d]; MMRankError for integer content, other shapes or none."""
    content, ids = arrays.get("content"), arrays["ids"]
    if content is None or content.dtype.kind != "f":
        have = "none" if content is None else content.dtype
        raise MMRankError(f"{items}: content is {have}: {ITEM_SET}")
    if content.shape != (len(ids), d):
        raise MMRankError(f"{items}: ids {ids.shape} and content {content.shape} must be [M] and [M, {d}]")
    return content.astype(np.float32)


def placed_rows(items: Path, arrays: dict[str, np.ndarray], served: ServedTable) -> np.ndarray:
    """New items' rows placed through the served model's item graph from the set's features."""
    placement = ItemPlacement.read(served.model / str(served.version) / TABLE_DIR)
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
    return placement.place({name: arrays[name] for name in placement.weights})


def table_with_items(items: Path, served: ServedTable) -> it.ItemTable:
    """The served table with the item set in `items` added, as the version it is published as."""
    arrays = load_item_set(items)
    if served.table.content is not None:
        content = item_content(items, arrays, served.table.d)
        return served.table.with_items(arrays["ids"], content, served.next)
    rows = placed_rows(items, arrays, served)
    return served.table.with_items(arrays["ids"], None, served.next, item_rows=rows)


def _probe(grpc, probe_id: int) -> list:
    inputs = []
    for name, ids in ((it.HISTORY_IDS, [[it.PAD_ID]]), (it.CANDIDATE_IDS, [[probe_id]])):
        inputs.append(grpc.InferInput(name, [1, 1], "INT64"))
        inputs[-1].set_data_from_numpy(np.array(ids, np.int64))
    return inputs


def wait_served(url: str, model: str, version: int, probe_id: int, wait_s: float) -> None:
    """Ask the server at `url` to load the table `model` (explicit mode; poll mode loads it itself) and wait
    until `rank` answers with `version`; MMRankError where the server refuses the load, `rank` has no
    item_table_version output, or it does not answer with `version` within `wait_s` (naming the last
    error: calls during the reload may fail)."""
    import tritonclient.grpc as grpc

    with grpc.InferenceServerClient(url) as client:
        try:
            client.load_model(model)
        except grpc.InferenceServerException as e:
            if "polling is enabled" not in str(e):  # poll mode: the server loads new versions by itself
                raise MMRankError(f"{url}: the server cannot load {model} version {version}: {e}") from e
        deadline, last = time.monotonic() + wait_s, None
        while time.monotonic() < deadline:
            try:
                answer = client.infer("rank", _probe(grpc, probe_id), client_timeout=30)
            except grpc.InferenceServerException as e:
                last = f"last error: {e.message() or e}"
            else:
                served = answer.as_numpy(it.TABLE_VERSION)
                if served is None:
                    raise MMRankError(
                        f"{url}: rank has no {it.TABLE_VERSION} output to say which table answers"
                    )
                if int(served.reshape(-1)[0]) == version:
                    return
                last = f"it answers with version {int(served.reshape(-1)[0])}"
            time.sleep(0.5)
    raise MMRankError(
        f"{url}: rank does not answer with item table version {version} after {wait_s:.0f} s ({last})"
    )


def publish(repo: Path, export: Path | None = None, items: Path | None = None) -> tuple[Path, it.ItemTable]:
    """Publish the next table version from an export or an item set: the new version's folder and
    table."""
    served = served_table(repo)
    table = table_from_export(export, served.table) if export else table_with_items(items, served)
    folder = add_table_version(repo, table, served)
    return folder, table


def grpc_address(url: str) -> str:
    """`--url` as tritonclient's gRPC client takes it: host:port, or grpc://host:port; anything else is
    refused before a version is published."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    if scheme != "grpc":
        raise MMRankError(f"--url {url!r}: expected the server's gRPC address, host:port or grpc://host:port")
    return rest


def cli(args) -> int:
    repo = Path(args.repo)
    url = grpc_address(args.url) if args.url else None
    folder, table = publish(
        repo, Path(args.export) if args.export else None, Path(args.items) if args.items else None
    )
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20
    print(
        f"table: published {folder.parent.name} version {folder.name} ({len(table.ids) - 1} items, "
        f"{size:.1f} MiB) in {repo}"
    )
    if url:
        wait_served(url, folder.parent.name, int(folder.name), int(table.ids[-1]), args.wait)
        print(f"table: {url} answers with item table version {folder.name}")
    return 0
