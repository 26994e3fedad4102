"""The native lookup graph (export/lookup_graph.py) against its plain reference, the numpy lookup of
model_repository/item_table.py: every product equal on random tables (dense and sparse ids, with and
without user tables, long histories) and random requests (unknown, padding and negative ids, empty and
over-long histories, unknown users, sent and missing user inputs), then merged into a real ranking graph:
scores within 1e-5 of the ranking graph run on the numpy lookup's products, flags equal."""

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import make_model
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import MMRankError
from export import lookup_graph as lg
from export.onnx_graphs import ExportConfig, export_model
from model_repository import item_table as it
from model_repository.limits import RequestLimits
from model_repository.ort_graph import OrtGraph

D, E = 3, 2


def _declared(name: str, elem_type: int, shape: list):
    return onnx.helper.make_tensor_value_info(name, elem_type, shape)


def _ranking_interface(cfg: it.LookupConfig, content: bool, items: bool):
    """A stand-in for the ranking graph's interface (lookup_model reads only its input declarations)."""
    f, i64, b = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64, onnx.TensorProto.BOOL
    inputs = [_declared(it.USER_ID, i64, ["batch"])]
    if cfg.user_feature_cards:
        inputs.append(_declared(it.USER_FEATS, i64, ["batch", len(cfg.user_feature_cards)]))
    if items:
        inputs.append(_declared(it.CANDIDATE_ITEM, f, ["batch", "candidates", E]))
    if content:
        inputs.append(_declared(it.CANDIDATE_C, f, ["batch", "candidates", D]))
        inputs += [
            _declared(it.HISTORY_C, f, ["batch", "history", D]),
            _declared(it.HISTORY_MASK, b, ["batch", "history"]),
        ]
        if cfg.long_history_len:
            inputs += [
                _declared(it.LONG_HISTORY_C, f, ["batch", "long", D]),
                _declared(it.LONG_HISTORY_MASK, b, ["batch", "long"]),
            ]
    inputs.append(_declared(it.CANDIDATE_KNOWN, b, ["batch", "candidates"]))
    graph = onnx.helper.make_graph([], "ranking", inputs, [])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)


def _session(model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # one thread: two runs of the same request compare exactly
    options.log_severity_level = 3  # the optional inputs' initializers draw a warning
    return ort.InferenceSession(model.SerializeToString(), options)


def _run(session, feeds: dict) -> dict:
    names = [o.name for o in session.get_outputs()]
    return dict(
        zip(names, session.run(names, {k: v for k, v in feeds.items() if v is not None}), strict=True)
    )


@st.composite
def tables(draw):
    rows = draw(st.integers(1, 40))
    sparse = draw(st.booleans())
    high = 2**40 if sparse else 2 * rows + 2
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    ids = np.unique(np.concatenate([[0], rng.integers(1, high, rows - 1)]))  # ascending, distinct
    rows = len(ids)
    columns = draw(st.sampled_from([("content",), ("items",), ("content", "items")]))
    content = rng.standard_normal((rows, D)).astype(np.float32) if "content" in columns else None
    items = rng.standard_normal((rows, E)).astype(np.float32) if "items" in columns else None
    cards = draw(st.lists(st.integers(1, 4), max_size=2))
    num_users = draw(st.integers(0, 5))
    users = None
    if cards and draw(st.booleans()):
        users = rng.integers(0, 5, (num_users + 1, len(cards)))
        users[0] = 0
    table = it.ItemTable(ids, content, items, user_feats=users)
    cfg = it.LookupConfig(draw(st.integers(1, 6)), draw(st.sampled_from([0, 4])), num_users, cards)
    return table, cfg, seed


def _request(table: it.ItemTable, cfg: it.LookupConfig, seed: int, b: int, hist: int, n: int):
    rng = np.random.default_rng(seed + 1)
    pool = np.concatenate([table.ids, [int(table.ids[-1]) + 1, -3, 0, 2**62]])
    feeds = {
        it.HISTORY_IDS: rng.choice(pool, (b, hist)).astype(np.int64),
        it.CANDIDATE_IDS: rng.choice(pool, (b, n)).astype(np.int64),
        it.USER_ID: None,
        it.USER_FEATS: None,
    }
    if rng.random() < 0.7:
        feeds[it.USER_ID] = rng.integers(-1, cfg.num_users + 3, (b, 1))
    if cfg.user_feature_cards and rng.random() < 0.5:
        feeds[it.USER_FEATS] = rng.integers(-1, 5, (b, len(cfg.user_feature_cards)))
    return feeds


def _reference(table, cfg, feeds) -> dict:
    user = feeds[it.USER_ID]
    return it.rank_inputs(
        table,
        cfg,
        feeds[it.HISTORY_IDS],
        feeds[it.CANDIDATE_IDS],
        None if user is None else user.reshape(-1),
        feeds[it.USER_FEATS],
    )


@settings(max_examples=40, deadline=None)
@given(
    tables(),
    st.sampled_from(["auto", "search"]),  # auto: dense for a dense table, search for a sparse one
    st.integers(1, 3),
    st.integers(0, 12),
    st.integers(0, 6),
)
def test_lookup_graph_products_equal_the_numpy_lookup(drawn, id_map, b, hist, n):
    table, cfg, seed = drawn
    ranking = _ranking_interface(cfg, table.content is not None, table.item_rows is not None)
    spec = lg.LookupSpec(lg.products_of(ranking), 7, max_history=1000, id_map=id_map)
    session = _session(lg.lookup_model(table, cfg, spec, ranking))
    feeds = _request(table, cfg, seed, b, hist, n)
    got = _run(session, feeds)
    want = _reference(table, cfg, feeds)
    for name in spec.products:
        value = got[lg.CHECKED.get(name, name)]
        assert np.array_equal(value.reshape(want[name].shape), want[name]), name
    assert np.array_equal(got[it.USER_KNOWN][:, 0], want[it.USER_KNOWN])
    assert (got[it.TABLE_VERSION] == 7).all() and got[it.TABLE_VERSION].shape == (b, 1)


def test_the_id_map_follows_the_span_of_the_ids():
    dense = it.ItemTable(np.arange(1001), None, np.ones((1001, E), np.float32))
    gaps = it.ItemTable(np.arange(0, 8008, 8), None, np.ones((1001, E), np.float32))
    sparse = it.ItemTable(np.array([0, 5, 2**40]), None, np.ones((3, E), np.float32))
    assert lg.id_map_kind(dense) == lg.id_map_kind(gaps) == "dense"
    assert lg.id_map_kind(sparse) == "search" and lg.id_map_kind(dense, "search") == "search"
    assert lg.id_map_bytes(dense, "dense") == 4 * 1001  # int32 row per id of the span
    assert lg.id_map_bytes(sparse, "search") == 8 * 4  # the ids padded to a power of two above 3
    with pytest.raises(MMRankError, match="would take 4194304 MiB: use the search map"):
        lg.id_map_kind(sparse, "dense")
    with pytest.raises(MMRankError, match="id map 'hash'"):
        lg.LookupSpec((), 1, 10, id_map="hash")


@pytest.fixture(scope="module")
def ranking_export(tmp_path_factory):
    """The conftest model's ranking graph and table (with a long history: every lookup product)."""
    model = make_model(**{"interest.long_len": 5})
    out = tmp_path_factory.mktemp("lookup") / "export"
    config = ExportConfig(fp16=False, torch_program=False, ranking_only=True, progress=False)
    manifest = export_model(model, out, {"path": "random-init", "sha256": "0" * 64}, None, config)
    users = np.array([[0], [1], [2], [0], [2], [1], [1]], np.int64)  # the dataset's user table
    table = it.ItemTable.read(out / "item_table")
    return out, replace(table, user_feats=users), manifest.model.lookup()


@pytest.mark.parametrize("id_map", ["dense", "search"])
def test_the_merged_graph_scores_like_the_ranking_graph_on_the_numpy_lookup(ranking_export, id_map):
    out, table, cfg = ranking_export
    assert cfg.long_history_len == 5 and table.user_feats is not None
    limits = RequestLimits(max_candidates=9, max_history=20)
    build = lg.NativeLookup(cfg, limits, merged=True, id_map=id_map, max_batch=3)  # every request fits
    session = _session(build.model(table, onnx.load(out / "ranking.onnx"), 4))
    ranking = OrtGraph(out / "ranking.onnx")
    rng = np.random.default_rng(0)
    for b, hist, n in ((1, 6, 5), (2, 0, 3), (3, 20, 9), (2, 7, 1)):
        feeds = _request(table, cfg, int(rng.integers(1 << 30)), b, hist, n)
        got = _run(session, feeds)
        want = _reference(table, cfg, feeds)
        scores = ranking.run(want)["scores"]
        assert np.array_equal(got[it.CANDIDATE_KNOWN], want[it.CANDIDATE_KNOWN])
        assert np.array_equal(np.isinf(got["scores"]), ~want[it.CANDIDATE_KNOWN])
        np.testing.assert_allclose(got["scores"], scores, atol=1e-5)
        assert np.array_equal(got[it.USER_KNOWN][:, 0], want[it.USER_KNOWN])
        assert (got[it.TABLE_VERSION] == 4).all()


def test_the_merged_graph_holds_the_request_bounds_itself(ranking_export):
    """It cannot refuse a request: no candidates answer empty, candidates past the limit -inf and
    unknown, a history past the limit keeps its most recent ids."""
    out, table, cfg = ranking_export
    build = lg.NativeLookup(cfg, RequestLimits(max_candidates=4, max_history=8))
    session = _session(build.model(table, onnx.load(out / "ranking.onnx"), 1))
    hist = np.arange(1, 13, dtype=np.int64)[None]
    none = _run(session, {it.HISTORY_IDS: hist, it.CANDIDATE_IDS: np.zeros((1, 0), np.int64)})
    assert none["scores"].shape == none[it.CANDIDATE_KNOWN].shape == (1, 0)
    many = np.arange(1, 8, dtype=np.int64)[None]
    got = _run(session, {it.HISTORY_IDS: hist, it.CANDIDATE_IDS: many})
    first = _run(session, {it.HISTORY_IDS: hist[:, -8:], it.CANDIDATE_IDS: many[:, :4]})
    np.testing.assert_array_equal(got["scores"][:, :4], first["scores"])
    assert np.isneginf(got["scores"][:, 4:]).all() and not got[it.CANDIDATE_KNOWN][:, 4:].any()


def test_the_merged_graph_answers_rows_past_max_batch_unranked(ranking_export):
    """Served as `rank` with no batching ensemble in front of it, the graph holds the batch bound: the
    first max_batch rows as a request of those rows alone, the rest -inf, unknown, the user unknown."""
    out, table, cfg = ranking_export
    build = lg.NativeLookup(cfg, RequestLimits(max_candidates=4, max_history=20), max_batch=2)
    session = _session(build.model(table, onnx.load(out / "ranking.onnx"), 3))
    feeds = _request(table, cfg, 11, 5, 7, 6)
    feeds[it.USER_ID] = np.full((5, 1), min(1, cfg.num_users), np.int64)
    got = _run(session, feeds)
    first = _run(session, {k: None if v is None else v[:2] for k, v in feeds.items()})
    assert got["scores"].shape == got[it.CANDIDATE_KNOWN].shape == (5, 6)
    assert got[it.USER_KNOWN].shape == got[it.TABLE_VERSION].shape == (5, 1)
    for name, value in first.items():
        np.testing.assert_array_equal(got[name][:2], value)
    assert np.isneginf(got["scores"][2:]).all() and not got[it.CANDIDATE_KNOWN][2:].any()
    assert not got[it.USER_KNOWN][2:].any() and (got[it.TABLE_VERSION] == 3).all()
    assert first[it.USER_KNOWN].all() == (cfg.num_users >= 1)


@pytest.mark.parametrize("id_map", ["dense", "search"])
@pytest.mark.parametrize("merged", [True, False])
def test_the_graph_holds_the_id_map_once(ranking_export, id_map, merged):
    """Candidate and history ids share one id map, of id_map_bytes."""
    out, table, cfg = ranking_export
    build = lg.NativeLookup(cfg, RequestLimits(), merged, id_map)
    model = build.model(table, onnx.load(out / "ranking.onnx"), 1)
    stem = {"dense": "row_of_id", "search": "sorted_ids"}[id_map]
    maps = [t for t in model.graph.initializer if t.name.startswith(f"{lg.PREFIX}{stem}_")]
    assert len(maps) == 1 and len(maps[0].raw_data) == lg.id_map_bytes(table, id_map)


def test_the_separate_lookup_feeds_the_ranking_graph_as_the_numpy_lookup_does(ranking_export):
    out, table, cfg = ranking_export
    build = lg.NativeLookup(cfg, RequestLimits(), merged=False)
    session = _session(build.model(table, onnx.load(out / "ranking.onnx"), 2))
    feeds = _request(table, cfg, 5, 2, 9, 4)
    got = _run(session, feeds)
    want = _reference(table, cfg, feeds)
    assert got[lg.CHECKED[it.USER_ID]].shape == (2, 1)  # a batching model's [batch] travels as [batch, 1]
    for name in lg.products_of(onnx.load(out / "ranking.onnx")):
        assert np.array_equal(got[lg.CHECKED.get(name, name)].reshape(want[name].shape), want[name])


def test_a_version_folder_is_checked_by_a_probe_request(ranking_export, tmp_path, monkeypatch):
    out, table, cfg = ranking_export
    build = lg.NativeLookup(cfg, RequestLimits(max_candidates=5, max_history=4))  # the probe cut to both
    folder = tmp_path / "3"
    folder.mkdir()
    (folder / lg.RANKING_FILE).write_bytes((out / "ranking.onnx").read_bytes())
    table.write(folder / lg.TABLE_DIR)
    monkeypatch.setattr(lg, "EXTERNAL_DATA_BYTES", 1)  # a large table: initializers in model.onnx.data
    assert build.write(folder, table, 3) == [folder / lg.MODEL_FILE, folder / "model.onnx.data"]
    build.check(folder, 3, (table.d, table.item_dim))
    lg.check_files(folder, 3)
    with pytest.raises(MMRankError, match="holds item_table_version 3, expected 4"):
        build.check(folder, 4)
    with pytest.raises(MMRankError, match="content width d is 16, the ranking graph reads 8"):
        build.check(folder, 3, (8, table.item_dim))
    header = onnx.load(str(folder / lg.MODEL_FILE), load_external_data=False)
    header.ir_version = 11  # what the venv's onnxruntime reads, the server's does not
    onnx.save(header, str(folder / lg.MODEL_FILE))
    for check in (build.check, lg.check_files):
        with pytest.raises(MMRankError, match="IR version 11, opset 17; the native backend's ONNX Runtime"):
            check(folder, 3)
    header.ir_version = 10
    onnx.save(header, str(folder / lg.MODEL_FILE))
    data = (folder / "model.onnx.data").read_bytes()
    (folder / "model.onnx.data").write_bytes(data[: len(data) // 2])
    for check in (build.check, lg.check_files):
        with pytest.raises(
            MMRankError, match=r"model.onnx.data: cut \(.* ends at byte \d+, the file has fewer\)"
        ):
            check(folder, 3)
    (folder / lg.MODEL_FILE).write_bytes(b"cut")
    with pytest.raises(MMRankError, match="model.onnx: not an ONNX graph"):
        lg.check_files(folder, 3)


def test_the_separate_lookup_reads_the_first_max_candidates_and_zero_rank(ranking_export):
    """The lookup before a ranking model holds the candidate bound too: the ranking step gets the first
    max_candidates candidates, as the numpy lookup gives them, and zero candidates score [B, 0]."""
    out, table, cfg = ranking_export
    build = lg.NativeLookup(cfg, RequestLimits(max_candidates=4, max_history=8), merged=False)
    ranking = onnx.load(out / "ranking.onnx")
    session = _session(build.model(table, ranking, 2))
    graph = OrtGraph(out / "ranking.onnx")
    hist, cands = np.arange(1, 13, dtype=np.int64)[None], np.arange(3, 10, dtype=np.int64)[None]
    for n, kept in ((7, 4), (0, 0)):
        feeds = {it.HISTORY_IDS: hist, it.CANDIDATE_IDS: cands[:, :n]}
        got = _run(session, feeds)
        sent = {**feeds, it.CANDIDATE_IDS: cands[:, :kept], it.USER_ID: None, it.USER_FEATS: None}
        want = _reference(table, cfg, sent)
        products = {}
        for name in lg.products_of(ranking):
            products[name] = got[lg.CHECKED.get(name, name)].reshape(want[name].shape)
            assert np.array_equal(products[name], want[name]), name
        assert graph.run(products)["scores"].shape == (1, kept)
