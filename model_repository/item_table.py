"""The serving item table and the lookup that turns request ids into the ranking graph's inputs.

A table is a folder (a version of the `item_lookup` model in the Triton repository):

    ids.npy         int64 [R]       item id of each row, ascending; row 0 is id 0 (padding)
    content.npy     float32 [R, d]  content vector c (the memory bank where present, else the tower)
    item_rows.npy   float32 [R, E]  the ranker's item token: item ID + item categorical embeddings
    user_feats.npy  int64 [U+1, F]  optional: each user's categorical features, row 0 (unknown) zeros
    table.json      format_version, version, rows, d, item_dim, the checkpoint it came from; written last

Unknown ids (absent from the table, negative) and id 0 fall back to row 0, the padding row:
- a candidate reads c = 0 and row 0 of the item token (item id 0, never a training target, and the
  "unknown" categorical embeddings) and is flagged in `candidate_known` (False); the ranking graph
  then scores it -inf (ranked last; see export/onnx_graphs.py RankingGraph), never from the padding row;
- a history item is dropped: the known items are kept in order, right-aligned, most recent last,
  exactly like the training histories (which never hold unknown items); unused slots are masked.
  A history longer than the model's L keeps its most recent L known items (the request's last ids).
Users: an id outside 1..num_users becomes 0 (unknown user) and is flagged in `user_known` (False; so is
a request without a user_id, which scores as that same unknown user), a user feature outside its
cardinality becomes 0 (unknown value). Features a request does not send come from user_feats.npy by user id (the
dataset's user table at export time), so a caller needs only the user id; without either they are 0.

Part of the serving runtime (numpy only); `export/item_table.py` builds a table from a trained model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from common.errors import MMRankError

TABLE_JSON = "table.json"
FORMAT_VERSION = 1  # of the table folder; a table of another format is refused (and skipped by serving)
PAD_ID = 0
HISTORY_IDS, CANDIDATE_IDS = "history_ids", "candidate_ids"  # the request's item ids
# Lookup products: each is a ranking-graph input of the same name, except candidate_known and user_known
# (outputs of the `rank` ensemble).
USER_ID, USER_FEATS, USER_KNOWN = "user_id", "user_feats", "user_known"
TABLE_VERSION = "item_table_version"  # a `rank` output: the table version that answered
CANDIDATE_C, CANDIDATE_ITEM, CANDIDATE_KNOWN = "candidate_c", "candidate_item", "candidate_known"
HISTORY_C, HISTORY_MASK = "history_c", "history_mask"
LONG_HISTORY_C, LONG_HISTORY_MASK = "long_history_c", "long_history_mask"


@dataclass
class ItemTable:
    ids: np.ndarray  # [R] int64, ascending, ids[0] == 0
    content: np.ndarray | None  # [R, d] float32
    item_rows: np.ndarray | None  # [R, E] float32
    version: int = 1
    source: dict | None = None  # what the table was built from (checkpoint sha256, export time)
    user_feats: np.ndarray | None = None  # [num_users + 1, F] int64 user features by id; row 0 zeros

    def __post_init__(self):
        self.ids = np.asarray(self.ids, dtype=np.int64)
        if self.ids.ndim != 1:
            raise MMRankError(f"item table ids have shape {self.ids.shape}, expected [rows]")
        r = len(self.ids)
        if r == 0 or self.ids[0] != PAD_ID or (r > 1 and not np.all(np.diff(self.ids) > 0)):
            raise MMRankError("item table ids must start with 0 (padding) and be strictly ascending")
        for name in ("content", "item_rows"):
            value = getattr(self, name)
            if value is not None:
                value = np.ascontiguousarray(value, dtype=np.float32)
                if value.ndim != 2 or value.shape[0] != r:
                    raise MMRankError(f"item table {name} has shape {value.shape}, expected [{r}, width]")
                setattr(self, name, value)
        self.check_finite()
        if self.user_feats is not None:
            self.user_feats = np.ascontiguousarray(self.user_feats, dtype=np.int64)
            if self.user_feats.ndim != 2 or len(self.user_feats) == 0 or self.user_feats[0].any():
                raise MMRankError("user_feats must be [num_users + 1, F] with row 0 (unknown user) all zeros")

    def check_finite(self) -> None:
        """Raise MMRankError where content or item_rows hold a NaN or an infinity: one in a row would make
        every score of a request that reads the row NaN."""
        for name in ("content", "item_rows"):
            value = getattr(self, name)
            bad = None if value is None else ~np.isfinite(value).all(axis=1)
            if bad is not None and bad.any():
                raise MMRankError(
                    f"item table {name} has NaN or infinite values in {int(bad.sum())} rows "
                    f"(the first at item id {int(self.ids[np.argmax(bad)])})"
                )

    @property
    def d(self) -> int:
        return 0 if self.content is None else int(self.content.shape[1])

    @property
    def item_dim(self) -> int:
        return 0 if self.item_rows is None else int(self.item_rows.shape[1])

    def rows_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Table rows and a known flag for ids of any shape; unknown ids and 0 -> row 0, False."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self.ids, ids).clip(0, len(self.ids) - 1)
        known = (self.ids[pos] == ids) & (ids != PAD_ID)
        return np.where(known, pos, 0), known

    def with_items(
        self, ids: np.ndarray, content: np.ndarray | None, version: int, item_rows: np.ndarray | None = None
    ) -> ItemTable:
        """A new version with rows for `ids` (new ids appended, known ids overwritten): `content` vectors
        (a table with content needs them) and, where given, `item_rows`.

        Without `item_rows` new items get row 0's item token: the ranker never saw their id, so their
        content vector is what it knows about them (EM3's cold start). A two-tower model's table has
        item rows only: its new items' rows come placed from their features
        (model_repository/item_placement.py)."""
        ids = np.asarray(ids, dtype=np.int64)
        if np.any(ids <= PAD_ID) or len(np.unique(ids)) != len(ids):
            raise MMRankError("new item ids must be positive and distinct")
        for name, given, have in (
            ("content vectors", content, self.content),
            ("item rows", item_rows, self.item_rows),
        ):
            if given is not None and have is None:
                raise MMRankError(f"this table has no {name} to update")
        if self.content is not None and content is None:
            raise MMRankError("this table's new items need content vectors")
        if content is None and item_rows is None:
            raise MMRankError("new items need content vectors or item rows")
        all_ids = np.union1d(self.ids, ids)
        old_pos, new_pos = np.searchsorted(all_ids, self.ids), np.searchsorted(all_ids, ids)
        new_content = None
        if self.content is not None:
            new_content = np.zeros((len(all_ids), self.d), np.float32)
            new_content[old_pos] = self.content
            new_content[new_pos] = np.asarray(content, dtype=np.float32).reshape(len(ids), self.d)
        new_rows = None
        if self.item_rows is not None:
            new_rows = np.repeat(self.item_rows[:1], len(all_ids), axis=0)
            new_rows[old_pos] = self.item_rows
            if item_rows is not None:
                new_rows[new_pos] = np.asarray(item_rows, dtype=np.float32).reshape(len(ids), self.item_dim)
        return ItemTable(all_ids, new_content, new_rows, version, self.source, self.user_feats)

    # ---- files --------------------------------------------------------------------------------------
    def write(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "ids.npy", self.ids)
        if self.content is not None:
            np.save(folder / "content.npy", self.content)
        if self.item_rows is not None:
            np.save(folder / "item_rows.npy", self.item_rows)
        if self.user_feats is not None:
            np.save(folder / "user_feats.npy", self.user_feats)
        meta = {
            "format_version": FORMAT_VERSION,
            "version": self.version,
            "rows": len(self.ids),
            "d": self.d,
            "item_dim": self.item_dim,
            "user_feats": self.user_feats is not None,
            "source": self.source or {},
            "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        tmp = folder / f".{TABLE_JSON}.tmp"
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
        os.replace(tmp, folder / TABLE_JSON)
        return folder

    @classmethod
    def read(cls, folder: str | Path) -> ItemTable:
        """The table in `folder`; MMRankError naming the file and the problem for anything that does not
        read or is not a valid table (so `newest_valid_table` passes over it)."""
        folder = Path(folder)
        path = folder / TABLE_JSON
        if not path.is_file():
            raise MMRankError(f"{folder}: not an item table (no {TABLE_JSON})")
        meta = _read_meta(path)
        ids = _read_array(folder / "ids.npy", "iu")
        content = _read_array(folder / "content.npy", "f") if meta["d"] else None
        rows = _read_array(folder / "item_rows.npy", "f") if meta["item_dim"] else None
        users = _read_array(folder / "user_feats.npy", "iu") if meta["user_feats"] else None
        try:
            table = cls(ids, content, rows, meta["version"], meta["source"], users)
        except MMRankError as e:
            raise MMRankError(f"{folder}: {e}") from e
        for name, have in (("rows", len(table.ids)), ("d", table.d), ("item_dim", table.item_dim)):
            if have != meta[name]:
                raise MMRankError(f"{folder}: item table {name} is {have}, {TABLE_JSON} says {meta[name]}")
        return table


META_COUNTS = ("version", "rows", "d", "item_dim")
_KINDS = {"iu": "integers", "f": "floats"}  # numpy dtype kinds: signed and unsigned int, float


def _read_meta(path: Path) -> dict:
    """table.json, checked: a JSON object whose counts are non-negative integers."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise MMRankError(f"{path}: unreadable item table ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict):
        raise MMRankError(f"{path}: unreadable item table: a JSON {type(meta).__name__}, expected an object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise MMRankError(
            f"{path}: item table format_version {meta.get('format_version')!r}, this version reads "
            f"{FORMAT_VERSION}; export the run again"
        )
    for key in META_COUNTS:
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise MMRankError(
                f"{path}: unreadable item table: {key} must be a non-negative integer, got {value!r}"
            )
    source = meta.get("source") or {}
    if not isinstance(source, dict):
        raise MMRankError(f"{path}: unreadable item table: source must be an object, got {source!r}")
    return {**meta, "source": source, "user_feats": bool(meta.get("user_feats"))}


def _read_array(path: Path, kinds: str) -> np.ndarray:
    """A .npy array whose dtype kind is one of `kinds` (a key of _KINDS)."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, MemoryError) as e:  # missing, empty, cut, lying header
        raise MMRankError(f"{path}: unreadable item table ({type(e).__name__}: {e})") from e
    if not isinstance(array, np.ndarray):  # np.load opens a .npz archive as well
        raise MMRankError(f"{path}: unreadable item table: not a .npy array")
    if array.dtype.kind not in kinds:
        raise MMRankError(f"{path}: unreadable item table: dtype {array.dtype}, expected {_KINDS[kinds]}")
    return array


@dataclass
class LookupConfig:
    """What the lookup needs besides the table (from the export manifest's model section)."""

    history_len: int
    long_history_len: int
    num_users: int
    user_feature_cards: list[int]


def recent_known(rows: np.ndarray, known: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """rows, known [B, L'] -> the last `length` known rows per line, right-aligned; [B, length] rows
    (0 where empty) and mask."""
    out_rows = np.zeros((rows.shape[0], length), rows.dtype)
    out_known = np.zeros((rows.shape[0], length), bool)
    if not known.all():  # the usual request has every history id known: nothing to move then
        order = np.argsort(known, axis=1, kind="stable")  # unknown first, known last, order kept
        known = np.take_along_axis(known, order, axis=1)
        rows = np.where(known, np.take_along_axis(rows, order, axis=1), 0)
    kept = min(rows.shape[1], length)
    if kept:
        out_rows[:, length - kept :] = rows[:, rows.shape[1] - kept :]
        out_known[:, length - kept :] = known[:, known.shape[1] - kept :]
    return out_rows, out_known


# Which table column each gathered product reads.
COLUMN_OF = {
    CANDIDATE_C: "content",
    CANDIDATE_ITEM: "item_rows",
    HISTORY_C: "content",
    LONG_HISTORY_C: "content",
}


def lookup_rows(
    table: ItemTable,
    cfg: LookupConfig,
    history_ids: np.ndarray,
    candidate_ids: np.ndarray,
    user_id: np.ndarray | None = None,
    user_feats: np.ndarray | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Request tensors (history_ids [B, L'], candidate_ids [B, N], user_id [B], user_feats [B, U]) ->
    (ready, rows): `ready` holds the products that need no table column (user_id, user_known, user_feats,
    candidate_known, the history masks), `rows` the table row indices of each product read from a column
    (COLUMN_OF), so the gather can run where the table lives (numpy here, the GPU for the torch backend)."""
    history_ids = np.asarray(history_ids, dtype=np.int64)
    candidate_ids = np.asarray(candidate_ids, dtype=np.int64)
    if history_ids.ndim != 2 or candidate_ids.ndim != 2 or history_ids.shape[0] != candidate_ids.shape[0]:
        raise MMRankError(
            f"history_ids {history_ids.shape} and candidate_ids {candidate_ids.shape} must be [B, L] and [B, N]"
        )
    b = candidate_ids.shape[0]
    users, known_user = _users(user_id, b, cfg.num_users)
    if user_feats is None and table.user_feats is not None:
        user_feats = table.user_feats[np.minimum(users, len(table.user_feats) - 1)]
    ready = {
        USER_ID: users,
        USER_KNOWN: known_user,
        USER_FEATS: _user_feats(user_feats, b, cfg.user_feature_cards),
    }
    cand_rows, ready[CANDIDATE_KNOWN] = table.rows_of(candidate_ids)
    rows = {}
    if table.content is not None:
        rows[CANDIDATE_C] = cand_rows
    if table.item_rows is not None:
        rows[CANDIDATE_ITEM] = cand_rows
    hist_rows, hist_known = table.rows_of(history_ids)
    for name_c, name_mask, length in (
        (HISTORY_C, HISTORY_MASK, cfg.history_len),
        (LONG_HISTORY_C, LONG_HISTORY_MASK, cfg.long_history_len),
    ):
        if length and table.content is not None:
            rows[name_c], ready[name_mask] = recent_known(hist_rows, hist_known, length)
    return ready, rows


def gather(columns: dict[str, object], rows: dict[str, object]) -> dict[str, object]:
    """{product: columns[COLUMN_OF[product]][rows]}: numpy arrays or torch tensors alike."""
    return {name: columns[COLUMN_OF[name]][r] for name, r in rows.items()}


def rank_inputs(
    table: ItemTable,
    cfg: LookupConfig,
    history_ids: np.ndarray,
    candidate_ids: np.ndarray,
    user_id: np.ndarray | None = None,
    user_feats: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Request tensors -> every lookup product, named as the ranking graph's inputs (plus
    candidate_known): `lookup_rows`, then the gather from the table's numpy columns."""
    ready, rows = lookup_rows(table, cfg, history_ids, candidate_ids, user_id, user_feats)
    return {**ready, **gather({"content": table.content, "item_rows": table.item_rows}, rows)}


def _users(user_id: np.ndarray | None, b: int, num_users: int) -> tuple[np.ndarray, np.ndarray]:
    """(user ids [B], 0 outside 0..num_users; user_known [B]: True for a sent id in 1..num_users)."""
    if user_id is None:
        return np.zeros(b, np.int64), np.zeros(b, bool)
    ids = np.asarray(user_id, dtype=np.int64).reshape(b)
    known = (ids >= 1) & (ids <= num_users)
    return np.where(known, ids, 0), known


def _user_feats(feats: np.ndarray | None, b: int, cards: list[int]) -> np.ndarray:
    if feats is None:
        return np.zeros((b, len(cards)), np.int64)
    feats = np.asarray(feats, dtype=np.int64).reshape(b, len(cards))
    return np.where((feats >= 0) & (feats < np.asarray(cards, np.int64)), feats, 0)


def table_versions(model_dir: str | Path) -> list[int]:
    """The version numbers of a model folder (its numeric subfolders), ascending."""
    return sorted(int(p.name) for p in Path(model_dir).iterdir() if p.is_dir() and p.name.isdigit())


def check_widths(table: ItemTable, d: int, item_dim: int) -> None:
    """The table must have the widths the ranking graph reads; raises MMRankError naming the first that
    differs."""
    for name, have, want in (("content width d", table.d, d), ("item token width", table.item_dim, item_dim)):
        if have != want:
            raise MMRankError(f"{name} is {have}, the ranking graph reads {want}")


def newest_valid_table(model_dir: str | Path, version: int, d: int | None, item_dim: int | None):
    """(table, its version, skipped): the table of `version`, or where it does not read or has the wrong
    widths (None: not checked), of the newest older version that does; `skipped` says which versions
    were passed over and why. A bad newest version then never blocks a (re)start: the newest valid
    table serves."""
    skipped = []
    for v in sorted((v for v in table_versions(model_dir) if v <= version), reverse=True):
        try:
            table = ItemTable.read(Path(model_dir) / str(v) / "item_table")
            if d is not None:
                check_widths(table, d, item_dim)
        except MMRankError as e:
            skipped.append(f"item table version {v} skipped: {e}")
            continue
        return table, v, skipped
    raise MMRankError(
        f"{model_dir}: no valid item table at or below version {version} ({'; '.join(skipped)})"
    )
