"""The item lookup as an ONNX graph: request ids in, the ranking graph's inputs out, the item table held as
initializers, so Triton's native backends serve `rank` with no Python step (export/repository.py renders
it merged in front of the ranking graph as `rank` itself, or as `item_lookup`, its own model before the
ranking model or a TensorRT engine in the `rank` ensemble).

The plain reference is model_repository/item_table.py (`rank_inputs`, `recent_known`), which documents
the fallbacks: the graph computes the same products with integer work and gathers only, so they are
equal, not close (tests/export/test_lookup_graph.py, on random tables and requests).

Inputs, full shapes (the model does not batch: Triton's onnxruntime backend refuses optional inputs on a
batching model, and `rank`'s user inputs are optional; the batch axis is in the dims, and the batching
`rank` ensemble feeds the separate lookup whole tensors, which Triton allows where the shapes agree):

    history_ids [B, L'], candidate_ids [B, N] int64
    user_id [B, 1], user_feats [B, U] int64, optional: initializers of zero rows that a request's tensor
    overrides, so the graph tells "not sent" (0 rows) from sent values

Outputs: the ranking graph's inputs (user_id and user_feats as checked_user_id [B, 1] and
checked_user_feats, so the request's names stay free), candidate_known [B, N], user_known [B, 1] (True
where a user_id in 1..num_users was sent) and item_table_version [B, 1] (the version built into the graph).

Ids -> rows, by the table's id span (`id_map_kind`; `id_map_bytes` is its memory, held once: candidate
and history ids go through the map together):
- dense: an int32 array over ids 0..max holding each id's row (0: absent), one Gather per id; 4 bytes per
  id of the span, used while the span is at most DENSE_SPAN rows per table row (a dataset's own numbering,
  with gaps and appended items);
- search: the ascending ids padded to a power of two P > rows, a branchless binary search of log2(P)
  steps (Gather, Less, Where, two Adds each); no memory beyond the ids (8 bytes a row), for sparse ids
  (hashes, a large catalogue's numbers).
History: the known rows, most recent `length` kept right-aligned, by one TopK over the positions of known
ids (TopK keeps the order of the positions it returns, so the reversed indices are the history in order).

Bounds the graph holds itself, since it cannot refuse a request: only the most recent `max_history` ids
of a history are read and only the first `max_candidates` candidates. The merged graph answers the rest
-inf and candidate_known False; the lookup alone hands the ranking step the first max_candidates
candidates only. The merged graph, served as `rank` with no batching ensemble in front of it, reads only
the first `max_batch` rows (Triton's max_batch_size) and answers the rows past them -inf, unknown and
with user_known False. So no request computes or allocates more than a request at the limits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import MMRankError
from export.native_runtime import check_native_runtime, fit_native_runtime
from model_repository import item_table as it
from model_repository.limits import RequestLimits

DENSE_SPAN = 16  # "auto": a dense id map while max id + 1 <= DENSE_SPAN x rows (<= 64 bytes a row)
DENSE_MAX_BYTES = 256 << 20  # a dense map asked for by name may be larger, up to this
ID_MAPS = ("auto", "dense", "search")
CHECKED = {it.USER_ID: "checked_user_id", it.USER_FEATS: "checked_user_feats"}
UNCHECKED = {checked: name for name, checked in CHECKED.items()}
EXTERNAL_DATA_BYTES = 100 << 20  # larger initializers go to model.onnx.data (protobuf's 2 GB limit)
INT64_MAX = np.iinfo(np.int64).max
PREFIX = "lookup/"  # every lookup tensor's name, so none clashes with the ranking graph's
VERSION_STEM = it.TABLE_VERSION  # the initializer holding the version (lookup/item_table_version_<n>)


@dataclass(frozen=True)
class LookupSpec:
    """What one lookup graph computes besides the table: the ranking graph's inputs it must produce,
    the version it answers with, the request bounds it holds and the id map."""

    products: tuple[str, ...]  # ranking-graph input names (item_table names)
    version: int
    max_history: int
    max_candidates: int | None = None  # the candidates read (the first ones); None: every candidate
    id_map: str = "auto"
    max_batch: int | None = None  # the rows the merged graph reads (the first ones); None: every row

    def __post_init__(self):
        if self.id_map not in ID_MAPS:
            raise MMRankError(f"id map {self.id_map!r}: expected one of {', '.join(ID_MAPS)}")


def id_map_kind(table: it.ItemTable, id_map: str = "auto") -> str:
    """The id map for this table, dense or search (`id_map` auto: by the span of its ids); MMRankError
    for a dense map over DENSE_MAX_BYTES beyond what auto would allow."""
    span = int(table.ids[-1]) + 1
    if id_map == "auto":
        return "dense" if span <= DENSE_SPAN * len(table.ids) else "search"
    if id_map == "dense" and span > DENSE_SPAN * len(table.ids) and 4 * span > DENSE_MAX_BYTES:
        raise MMRankError(
            f"a dense id map of this item table (ids up to {span - 1}) would take {4 * span >> 20} MiB: "
            "use the search map (id_map auto or search)"
        )
    return id_map


def id_map_bytes(table: it.ItemTable, kind: str) -> int:
    """Memory the id -> row map adds to the table's columns (the graph holds it once)."""
    if kind == "dense":
        return 4 * (int(table.ids[-1]) + 1)
    return 8 * (1 << len(table.ids).bit_length())


class _Graph:
    """Nodes and initializers of one graph under construction; every name starts with PREFIX."""

    def __init__(self):
        self.nodes, self.initializers, self.count = [], [], 0

    def _name(self, stem: str) -> str:
        self.count += 1
        return f"{PREFIX}{stem}_{self.count}"

    def const(self, value, dtype=np.int64, stem: str = "const") -> str:
        from onnx import numpy_helper

        tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype), self._name(stem))
        self.initializers.append(tensor)
        return tensor.name

    def op(self, op_type: str, *inputs: str, outputs: int = 1, name: str | None = None, **attrs):
        """One node; its output name (`name` where given), or a list of `outputs` names."""
        from onnx import helper

        node_name = self._name(op_type)
        outs = [name] if name else [f"{node_name}:{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=node_name, **attrs))
        return outs[0] if outputs == 1 else outs


def _dense_rows(g: _Graph, table: it.ItemTable, ids: str) -> tuple[str, str]:
    """rows (int32, 0 where unknown), known: a Gather from the id -> row array."""
    span = int(table.ids[-1]) + 1
    row_of = np.zeros(span, np.int32)
    row_of[table.ids] = np.arange(len(table.ids), dtype=np.int32)  # ids[0] = 0 -> row 0: never known
    inside = g.op("Clip", ids, g.const(0), g.const(span - 1))
    rows = g.op("Gather", g.const(row_of, np.int32, "row_of_id"), inside)
    known = g.op("And", g.op("Equal", inside, ids), g.op("Greater", rows, g.const(0, np.int32)))
    return g.op("Where", known, rows, g.const(0, np.int32)), known


def _search_rows(g: _Graph, table: it.ItemTable, ids: str) -> tuple[str, str]:
    """rows (int32, 0 where unknown), known: lower_bound of each id in the padded ascending ids."""
    r = len(table.ids)
    padded = np.full(1 << r.bit_length(), INT64_MAX, np.int64)  # a power of two > r: one pad at least
    padded[:r] = table.ids
    table_ids = g.const(padded, stem="sorted_ids")
    pos = g.op("Mul", ids, g.const(0))  # zeros of the ids' shape
    step = len(padded) // 2
    while step:
        probe = g.op("Gather", table_ids, g.op("Add", pos, g.const(step - 1)))
        pos = g.op("Where", g.op("Less", probe, ids), g.op("Add", pos, g.const(step)), pos)
        step //= 2
    found = g.op("Equal", g.op("Gather", table_ids, pos), ids)
    inside = g.op("And", g.op("Greater", pos, g.const(0)), g.op("Less", pos, g.const(r)))
    known = g.op("And", found, inside)  # position 0 is id 0, the padding: never known
    return g.op("Cast", g.op("Where", known, pos, g.const(0)), to=6), known  # 6: int32


def _recent(g: _Graph, rows: str, batch: str, length: int) -> str:
    """[B, L'] rows (0 = unknown) -> [B, length]: the last `length` known rows, right-aligned, zeros
    before them (item_table.recent_known). Known rows are > 0 (row 0 is the padding id's)."""
    lead = g.op(
        "ConstantOfShape",
        g.op("Concat", batch, g.const([length]), axis=0),
        value=_tensor_attr(np.zeros(1, np.int32)),
    )
    padded = g.op("Concat", lead, rows, axis=1)  # [B, length + L']: at least `length` slots
    width = g.op("Squeeze", g.op("Shape", padded, start=1, end=2), g.const([0]))
    positions = g.op("Range", g.const(1), g.op("Add", width, g.const(1)), g.const(1))
    key = g.op("Where", g.op("Greater", padded, g.const(0, np.int32)), positions, g.const(0))
    _, newest_first = g.op("TopK", key, g.const([length]), outputs=2, axis=1, largest=1, sorted=1)
    order = g.op("Slice", newest_first, g.const([-1]), g.const([-INT64_MAX]), g.const([1]), g.const([-1]))
    return g.op("GatherElements", padded, order, axis=1)


def _tensor_attr(value: np.ndarray):
    from onnx import numpy_helper

    return numpy_helper.from_array(value)


def _users(g: _Graph, table: it.ItemTable, cfg: it.LookupConfig, batch: str, spec: LookupSpec) -> dict:
    """checked_user_id [B] (outside 0..num_users: 0), user_known [B, 1], checked_user_feats [B, U]."""
    out = {}
    sent = g.op("Reshape", it.USER_ID, g.const([-1]))
    zeros = g.op("ConstantOfShape", batch, value=_tensor_attr(np.zeros(1, np.int64)))
    user = g.op("Slice", g.op("Concat", sent, zeros, axis=0), g.const([0]), batch)  # sent, else 0
    at_most = g.op("LessOrEqual", user, g.const(cfg.num_users))
    valid = g.op("And", g.op("GreaterOrEqual", user, g.const(0)), at_most)
    users = g.op("Where", valid, user, g.const(0))
    out[it.USER_ID] = users
    known = g.op("And", g.op("Greater", user, g.const(0)), at_most)
    out[it.USER_KNOWN] = g.op("Unsqueeze", known, g.const([1]))
    cards = cfg.user_feature_cards
    if it.USER_FEATS in spec.products:
        width = g.op("Concat", batch, g.const([len(cards)]), axis=0)
        fill = g.op("ConstantOfShape", width, value=_tensor_attr(np.zeros(1, np.int64)))
        feats = g.op("Slice", g.op("Concat", it.USER_FEATS, fill, axis=0), g.const([0]), batch)
        if table.user_feats is not None:  # not sent: the user's row of the dataset's user table
            rows = g.op("Min", users, g.const(len(table.user_feats) - 1))
            by_id = g.op("Gather", g.const(table.user_feats, stem="user_feats_by_id"), rows)
            rows_sent = g.op("Shape", it.USER_FEATS, start=0, end=1)
            feats = g.op("Where", g.op("Greater", rows_sent, g.const([0])), feats, by_id)
        cards_in = g.op("Less", feats, g.const(np.asarray(cards, np.int64)))
        ok = g.op("And", g.op("GreaterOrEqual", feats, g.const(0)), cards_in)
        out[it.USER_FEATS] = g.op("Where", ok, feats, g.const(0))
    return out


def _rows_fn(table: it.ItemTable, spec: LookupSpec):
    return _dense_rows if id_map_kind(table, spec.id_map) == "dense" else _search_rows


def _rows(g: _Graph, table: it.ItemTable, spec: LookupSpec, candidates: str, history: str | None):
    """(candidate rows, candidate_known, history rows or None) from one id map: the candidate and
    history ids go through it together, so the graph holds the map once."""
    rows_of = _rows_fn(table, spec)
    if history is None:
        return (*rows_of(g, table, candidates), None)
    rows, known = rows_of(g, table, g.op("Concat", candidates, history, axis=1))
    n = g.op("Shape", candidates, start=1, end=2)
    first, axis = g.const([0]), g.const([1])
    cand_rows, cand_known = (g.op("Slice", t, first, n, axis) for t in (rows, known))
    return cand_rows, cand_known, g.op("Slice", rows, n, g.const([INT64_MAX]), axis)


def build_lookup(
    g: _Graph, table: it.ItemTable, cfg: it.LookupConfig, spec: LookupSpec, candidates: str
) -> dict[str, str]:
    """The lookup's nodes in `g`, reading the graph inputs (history_ids, `candidates`, user_id,
    user_feats): {product or output name: tensor name}."""
    batch = g.op("Shape", candidates, start=0, end=1)
    out = _users(g, table, cfg, batch, spec)
    version = g.const([[spec.version]], stem=VERSION_STEM)
    out[it.TABLE_VERSION] = g.op("Expand", version, g.op("Concat", batch, g.const([1]), axis=0))
    history = [
        (name_c, name_mask, length)
        for name_c, name_mask, length in (
            (it.HISTORY_C, it.HISTORY_MASK, cfg.history_len),
            (it.LONG_HISTORY_C, it.LONG_HISTORY_MASK, cfg.long_history_len),
        )
        if name_c in spec.products
    ]
    recent = None
    if history:  # only the most recent max_history ids are read
        last = g.const([-spec.max_history])
        recent = g.op("Slice", it.HISTORY_IDS, last, g.const([INT64_MAX]), g.const([1]))
    cand_rows, out[it.CANDIDATE_KNOWN], hist_rows = _rows(g, table, spec, candidates, recent)
    columns = {}
    if table.content is not None:
        columns["content"] = g.const(table.content, np.float32, "content")
    if table.item_rows is not None:
        columns["item_rows"] = g.const(table.item_rows, np.float32, "item_rows")
    for name in (it.CANDIDATE_C, it.CANDIDATE_ITEM):
        if name in spec.products:
            out[name] = g.op("Gather", columns[it.COLUMN_OF[name]], cand_rows)
    for name_c, name_mask, length in history:
        rows = _recent(g, hist_rows, batch, length)
        out[name_c] = g.op("Gather", columns["content"], rows)
        out[name_mask] = g.op("Greater", rows, g.const(0, np.int32))
    missing = sorted(set(spec.products) - set(out))
    if missing:
        raise MMRankError(f"the item table cannot produce the ranking graph's inputs {missing}")
    return out


# ---- whole models ----------------------------------------------------------------------------------
def _value_info(name: str, elem_type: int, shape: list):
    from onnx import helper

    return helper.make_tensor_value_info(name, elem_type, shape)


def _request_inputs(g: _Graph, cfg: it.LookupConfig, spec: LookupSpec) -> list:
    """The graph inputs; user_id and user_feats with zero-row initializers of their own name (optional)."""
    from onnx import TensorProto, numpy_helper

    inputs = [
        _value_info(it.HISTORY_IDS, TensorProto.INT64, ["batch", "history"]),
        _value_info(it.CANDIDATE_IDS, TensorProto.INT64, ["batch", "candidates"]),
        _value_info(it.USER_ID, TensorProto.INT64, ["batch", 1]),
    ]
    g.initializers.append(numpy_helper.from_array(np.zeros((0, 1), np.int64), it.USER_ID))
    if it.USER_FEATS in spec.products:
        width = len(cfg.user_feature_cards)
        inputs.append(_value_info(it.USER_FEATS, TensorProto.INT64, ["batch", width]))
        g.initializers.append(numpy_helper.from_array(np.zeros((0, width), np.int64), it.USER_FEATS))
    return inputs


def _flag_outputs() -> list:
    from onnx import TensorProto

    return [
        _value_info(it.CANDIDATE_KNOWN, TensorProto.BOOL, ["batch", "candidates"]),
        _value_info(it.USER_KNOWN, TensorProto.BOOL, ["batch", 1]),
        _value_info(it.TABLE_VERSION, TensorProto.INT64, ["batch", 1]),
    ]


def _model(g: _Graph, inputs, outputs, opset: int, ir_version: int, name: str):
    """The ModelProto, at the ranking graph's opset and IR version, readable by the native backend."""
    from onnx import helper

    graph = helper.make_graph(g.nodes, name, inputs, outputs, initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="mmrank")
    model.ir_version = ir_version
    return fit_native_runtime(model)


def _name_outputs(g: _Graph, out: dict[str, str], names: dict[str, str]) -> None:
    """Identity nodes giving the tensors `out[key]` their output names `names[key]`."""
    for key, name in names.items():
        g.op("Identity", out[key], name=name)


def _kept_candidates(g: _Graph, spec: LookupSpec) -> str:
    """The candidate ids the lookup reads: the first max_candidates (all where None)."""
    if spec.max_candidates is None:
        return it.CANDIDATE_IDS
    return g.op("Slice", it.CANDIDATE_IDS, g.const([0]), g.const([spec.max_candidates]), g.const([1]))


def lookup_model(table: it.ItemTable, cfg: it.LookupConfig, spec: LookupSpec, ranking):
    """The lookup alone (its own model, in front of the ranking model or engine): ids in, the ranking
    graph's inputs out as `ranking` (its onnx.ModelProto) declares them, user_id as checked_user_id
    [B, 1] (a batching model's [batch] tensor travels as [batch, 1]). With max_candidates, the
    candidate products and candidate_known are those of the first max_candidates candidates only: the
    ranking step after it scores no more, and `rank` answers that many."""
    g = _Graph()
    inputs = _request_inputs(g, cfg, spec)
    out = build_lookup(g, table, cfg, spec, _kept_candidates(g, spec))
    out[it.USER_ID] = g.op("Unsqueeze", out[it.USER_ID], g.const([1]))
    names = {n: CHECKED.get(n, n) for n in spec.products if n != it.CANDIDATE_KNOWN}
    _name_outputs(g, out, names)
    outputs = []
    for declared in ranking.graph.input:
        if declared.name in names:
            outputs.append(type(declared)())
            outputs[-1].CopyFrom(declared)
            outputs[-1].name = names[declared.name]
            if declared.name == it.USER_ID:
                outputs[-1].type.tensor_type.shape.dim.add().dim_value = 1
    _name_outputs(g, out, {n: n for n in (it.CANDIDATE_KNOWN, it.USER_KNOWN, it.TABLE_VERSION)})
    return _model(g, inputs, outputs + _flag_outputs(), _opset(ranking), ranking.ir_version, "item_lookup")


def _opset(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _rename(nodes, names: dict[str, str]) -> None:
    """Every reference to a tensor named in `names` (node inputs and outputs, in subgraphs too) renamed."""
    for node in nodes:
        node.input[:] = [names.get(x, x) for x in node.input]
        node.output[:] = [names.get(x, x) for x in node.output]
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                _rename(sub.node, names)


def _first_rows(g: _Graph, inputs, max_batch: int) -> None:
    """Every node so far reads the first `max_batch` rows of each request tensor instead of the whole."""
    names = {i.name: f"{PREFIX}{i.name}_rows" for i in inputs}
    _rename(g.nodes, names)
    built = g.nodes
    g.nodes = []
    for name, rows in names.items():
        g.op("Slice", name, g.const([0]), g.const([max_batch]), g.const([0]), name=rows)
    g.nodes.extend(built)


def ranked_model(table: it.ItemTable, cfg: it.LookupConfig, spec: LookupSpec, ranking):
    """The lookup merged in front of the ranking graph `ranking` (an onnx.ModelProto, taken apart): ids
    in; scores [B, N] (-inf for unknown candidates and those past max_candidates), candidate_known,
    user_known and item_table_version out."""
    from onnx import TensorProto

    g = _Graph()
    inputs = _request_inputs(g, cfg, spec)
    kept = _kept_candidates(g, spec)
    out = build_lookup(g, table, cfg, spec, kept)
    body = ranking.graph
    scores = f"{PREFIX}ranking_scores"
    _rename(body.node, {**{i.name: out[i.name] for i in body.input}, body.output[0].name: scores})
    g.nodes.extend(body.node)
    g.initializers.extend(body.initializer)
    if spec.max_batch is not None:
        _first_rows(g, inputs, spec.max_batch)
    # Back to the request's B and N: rows past max_batch and candidates past max_candidates -inf and
    # unknown (the graph's tensors above have the kept shape).
    kept_shape = g.op("Shape", out[it.CANDIDATE_KNOWN])
    rest = g.op("Sub", g.op("Shape", it.CANDIDATE_IDS), kept_shape)
    pads = g.op("Concat", g.const([0, 0]), rest, axis=0)
    row_pads = g.op("Mul", pads, g.const([1, 1, 1, 0]))
    results = {}
    for name, tensor, fill, where in (
        ("scores", scores, g.const(-np.inf, np.float32), pads),
        (it.CANDIDATE_KNOWN, out[it.CANDIDATE_KNOWN], g.const(False, np.bool_), pads),
        (it.USER_KNOWN, out[it.USER_KNOWN], g.const(False, np.bool_), row_pads),
        (it.TABLE_VERSION, out[it.TABLE_VERSION], g.const(spec.version), row_pads),
    ):
        results[name] = g.op("Pad", tensor, where, fill)
    _name_outputs(g, results, {n: n for n in results})
    outputs = [_value_info("scores", TensorProto.FLOAT, ["batch", "candidates"]), *_flag_outputs()]
    return _model(g, inputs, outputs, _opset(ranking), ranking.ir_version, "rank")


def products_of(ranking) -> tuple[str, ...]:
    """The ranking graph's input names, in order (what the lookup must produce)."""
    return tuple(i.name for i in ranking.graph.input)


def write_model(model, path: Path) -> list[Path]:
    """`model` as `path`; initializers over a few kB go to `path`.data when the whole is over
    EXTERNAL_DATA_BYTES. Returns the files written."""
    import onnx

    path = Path(path)
    large = sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
    if not large:
        onnx.save(model, path)
        return [path]
    data = path.with_name(path.name + ".data")
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    return [path, data]


# ---- table versions ---------------------------------------------------------------------------------
MODEL_FILE, RANKING_FILE, TABLE_DIR = "model.onnx", "ranking.onnx", "item_table"
PROBE_ATOL = 1e-4  # the merged graph against the ranking graph run on the numpy lookup's products


@dataclass(frozen=True)
class NativeLookup:
    """How the native table model builds each version's graph: from the version folder's item table and
    ranking graph (TABLE_DIR, RANKING_FILE), as its config's parameters say (export/repository.py)."""

    lookup: it.LookupConfig
    limits: RequestLimits
    merged: bool = True
    id_map: str = "auto"
    max_batch: int | None = None  # merged: the rows a request's answer is computed for (the rest -inf)

    @classmethod
    def from_params(cls, params: dict[str, str]) -> NativeLookup:
        """From the table model's config parameters (name -> string value)."""
        build = json.loads(params["lookup_graph"])
        lookup = it.LookupConfig(**json.loads(params["lookup"]))
        limits = RequestLimits(**json.loads(params["limits"]))
        return cls(lookup, limits, build["merged"], build["id_map"], build.get("max_batch"))

    def model(self, table: it.ItemTable, ranking, version: int):
        """The version's graph: the lookup merged into `ranking` (an onnx.ModelProto) or before it."""
        limits = self.limits
        spec = LookupSpec(
            products_of(ranking),
            version,
            limits.max_history,
            limits.max_candidates,
            self.id_map,
            self.max_batch,
        )
        return (ranked_model if self.merged else lookup_model)(table, self.lookup, spec, ranking)

    def write(self, folder: Path, table: it.ItemTable, version: int) -> list[Path]:
        """MODEL_FILE (and its external data) in `folder`, which holds RANKING_FILE."""
        import onnx

        model = self.model(table, onnx.load(Path(folder) / RANKING_FILE), version)
        return write_model(model, Path(folder) / MODEL_FILE)

    def check(
        self,
        folder: Path,
        version: int,
        widths: tuple[int, int] | None = None,
        table: it.ItemTable | None = None,
    ) -> None:
        """MMRankError unless `folder` is a version that serves: its table (`table`, the folder's read
        back, else read here) has the ranking graph's `widths` (d, item_dim) where given, its graph
        passes `check_files`, loads in onnxruntime and answers a probe request as the numpy lookup and
        the ranking graph do, with `version`."""
        from model_repository.ort_graph import OrtGraph

        folder = Path(folder)
        table = it.ItemTable.read(folder / TABLE_DIR) if table is None else table
        if widths is not None:
            it.check_widths(table, *widths)
        check_files(folder, version)
        graph = OrtGraph(folder / MODEL_FILE)
        feeds = {k: v[: self.max_batch] for k, v in probe_request(table, self.lookup, self.limits).items()}
        names = [o.name for o in graph.session.get_outputs()]
        try:
            got = dict(zip(names, graph.session.run(names, feeds), strict=True))
        except Exception as e:  # onnxruntime's own error types
            raise MMRankError(f"{folder / MODEL_FILE}: the graph fails on a probe request ({e})") from e
        want = it.rank_inputs(
            table, self.lookup, feeds[it.HISTORY_IDS], feeds[it.CANDIDATE_IDS], feeds[it.USER_ID]
        )
        if self.merged:
            want["scores"] = OrtGraph(folder / RANKING_FILE).run(want)["scores"]
        problem = _probe_mismatch(got, want, version)
        if problem:
            raise MMRankError(f"{folder / MODEL_FILE}: {problem}")


def check_files(folder: Path, version: int) -> None:
    """MMRankError unless `folder`'s graph looks whole, without running it (what a server start checks;
    `NativeLookup.check` does this first): the file parses, the server's ONNX Runtime reads its IR
    version and opset, it holds `version`, and its external data file holds every tensor it points
    into. Initializers in the external data file (a table over EXTERNAL_DATA_BYTES) are never read."""
    from onnx import numpy_helper

    path = Path(folder) / MODEL_FILE
    model = graph_header(path)
    check_native_runtime(model, str(path))
    stem = f"{PREFIX}{VERSION_STEM}_"
    held = [numpy_helper.to_array(t) for t in model.graph.initializer if t.name.startswith(stem)]
    if len(held) != 1 or held[0].size != 1:
        raise MMRankError(f"{path}: not a lookup graph of this version (no item_table_version constant)")
    if int(held[0].item()) != version:
        raise MMRankError(f"{path}: holds item_table_version {int(held[0].item())}, expected {version}")
    for tensor in model.graph.initializer:
        if tensor.data_location == tensor.EXTERNAL:
            where = {e.key: e.value for e in tensor.external_data}
            data = path.with_name(where.get("location", ""))
            end = int(where.get("offset", 0)) + int(where.get("length", 0))
            if not data.is_file():
                raise MMRankError(f"{data}: missing (the external data of {path.name})")
            if data.stat().st_size < end:
                raise MMRankError(f"{data}: cut ({tensor.name} ends at byte {end}, the file has fewer)")


def graph_header(path: Path):
    """The ONNX file at `path` without its external data (initializers over EXTERNAL_DATA_BYTES stay on
    disk); MMRankError where it does not parse."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        return onnx.load(str(path), load_external_data=False)
    except (OSError, DecodeError, ValueError) as e:
        raise MMRankError(f"{path}: not an ONNX graph ({type(e).__name__}: {e})") from e


def probe_request(table: it.ItemTable, cfg: it.LookupConfig, limits: RequestLimits) -> dict[str, np.ndarray]:
    """Two users' requests that reach every branch of the lookup: known and unknown candidates and
    history ids, padding, a known and an unknown user; within `limits`, where the graph answers as the
    numpy lookup does."""
    known = table.ids[1:9]
    unknown = int(table.ids[-1]) + 1
    hist = np.array([[*known, unknown, 0], [0, unknown, *known[::-1]]], np.int64)
    cands = np.array([[unknown, *known, 0], [*known[::-1], 0, unknown]], np.int64)
    users = np.array([[min(1, cfg.num_users)], [cfg.num_users + 1]], np.int64)
    return {
        it.HISTORY_IDS: hist[:, -limits.max_history :],
        it.CANDIDATE_IDS: cands[:, : limits.max_candidates],
        it.USER_ID: users,
    }


def _probe_mismatch(got: dict, want: dict, version: int) -> str | None:
    """What differs between the graph's answer and the reference, or None."""
    for name, value in got.items():
        if name == it.TABLE_VERSION:
            if not (value == version).all():
                return f"answers item_table_version {value.ravel()[:1]}, expected {version}"
            continue
        ref = want[UNCHECKED.get(name, name)]
        value = value.reshape(ref.shape)
        if value.dtype.kind == "f":
            close = np.isclose(value, ref, atol=PROBE_ATOL, rtol=0) | (np.isinf(ref) & (value == ref))
            if not close.all():
                return f"{name} differs from the reference lookup on a probe request"
        elif not np.array_equal(value, ref):
            return f"{name} differs from the reference lookup on a probe request"
    return None
