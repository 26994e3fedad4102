"""A two-tower graph model exported and served like every other model: the generic lookup's user_id and
candidate_item feed a ranking graph that holds the user table, with the trainer's scores (ONNX fp32 and
fp16, the torch program, the real tritonserver); the user table; new items placed through FREEDOM's kNN
graph where the model has one, unknown where it has not."""

import numpy as np
import pytest
import torch

from export.manifest import Manifest
from export.onnx_graphs import ExportConfig, export_model
from export.parity import composed_scores, training_scores
from model_repository import item_table as it
from model_repository.item_placement import ItemPlacement
from trainer.model.build import build_model
from trainer.model.config import ContentConfig, GraphConfig, LossConfig, ModelConfig
from trainer.model.ranking_model import ModelSchema

NUM_USERS, NUM_ITEMS = 9, 40


def _model(name: str):
    gen = torch.Generator().manual_seed(0)
    feats = {}
    for modality, dim in (("text_feat", 6), ("image_feat", 5)):
        x = torch.randn(NUM_ITEMS + 1, 1, dim, generator=gen)
        x[0] = 0
        feats[modality] = (x, x.abs().sum(-1) > 0)
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(1, NUM_USERS + 1), 6)
    items = np.concatenate(
        [rng.choice(np.arange(1, NUM_ITEMS - 3), 6, replace=False) for _ in range(NUM_USERS)]
    )
    schema = ModelSchema(
        NUM_ITEMS,
        NUM_USERS,
        torch.zeros(NUM_ITEMS + 1, 0, dtype=torch.int64),
        (),
        (),
        feats,
        None,
        (users, items),
    )
    cfg = ModelConfig(
        content=ContentConfig(d=8, num_queries=2, fusion_heads=2),
        loss=LossConfig(main="bpr", cic_alpha=0.001, cic_dim=8, cic_negatives=4),
        graph=GraphConfig(model=name, dim=4, knn_k=3),
    )
    torch.manual_seed(1)
    return build_model(cfg, schema).eval()


def _export(name: str, out):
    model = _model(name)
    export_model(model, out, {"path": "random-init", "sha256": "0" * 64}, config=ExportConfig(progress=False))
    return model, out


@pytest.fixture(scope="module", params=["lightgcn", "freedom", "em3_freedom"])
def exported(request, tmp_path_factory):
    return _export(request.param, tmp_path_factory.mktemp(request.param) / "export")


def _requests():
    rng = np.random.default_rng(3)
    cands = rng.integers(1, NUM_ITEMS + 1, (3, 11)).astype(np.int64)
    cands[1, 4] = NUM_ITEMS + 7  # an id the table does not have
    return np.zeros((3, 1), np.int64), cands, np.array([1, NUM_USERS, 4], np.int64)


def test_served_scores_are_the_trainers_dot_products(exported):
    model, out = exported
    manifest = Manifest.read(out)
    assert set(manifest.graphs) == {"ranking"}
    assert [t.name for t in manifest.graph("ranking").inputs] == [
        it.USER_ID,
        it.CANDIDATE_ITEM,
        it.CANDIDATE_KNOWN,
    ]
    hist, cands, users = _requests()
    expected = model.full_scores(torch.from_numpy(users)).gather(
        1, torch.from_numpy(cands).clamp_max(NUM_ITEMS)
    )
    expected = expected.numpy()
    for precision, atol in (("fp32", 1e-6), ("fp16", 2e-2)):
        served = composed_scores(out, hist, cands, users, precision=precision)
        assert np.isneginf(served[1, 4]) and np.isfinite(np.delete(served.reshape(-1), 15)).all()
        known = np.isfinite(served)
        np.testing.assert_allclose(served[known], expected[known], atol=atol, rtol=0)
    clean = cands.copy()
    clean[1, 4] = 1
    np.testing.assert_allclose(
        composed_scores(out, hist, clean, users),
        training_scores(model, hist, clean, users, np.zeros((3, 0), np.int64)),
        atol=1e-6,
    )
    unknown_user = composed_scores(out, hist[:1], clean[:1], np.array([NUM_USERS + 5]))
    assert not unknown_user.any()  # the unknown user's row is zeros


def test_the_torch_program_scores_like_the_onnx_graph(exported):
    model, out = exported
    hist, cands, users = _requests()
    manifest = Manifest.read(out)
    program = torch.export.load(out / manifest.programs["ranking"].file).module()
    table = it.ItemTable.read(out / "item_table")
    feeds = it.rank_inputs(table, manifest.model.lookup(), hist, cands, users)
    args = [torch.from_numpy(np.asarray(feeds[name])) for name in manifest.programs["ranking"].inputs]
    np.testing.assert_allclose(program(*args).numpy(), composed_scores(out, hist, cands, users), atol=1e-6)


def test_the_user_table_and_the_placement_of_new_items(exported):
    model, out = exported
    manifest = Manifest.read(out)
    users, items = model.tables()
    np.testing.assert_array_equal(np.load(out / manifest.user_table), users.numpy())
    placement = ItemPlacement.read(out / "item_table")
    if model.cfg.graph.model == "lightgcn":
        assert placement is None  # no item-item graph: a new id stays unknown
        return
    # An item placed by its own features lands on its neighbours (itself among them): exactly the
    # model's item-item term S R of that item.
    ids = np.arange(1, NUM_ITEMS + 1)
    features = {name: model.schema.modalities[name][0][ids, 0].numpy() for name in placement.weights}
    with torch.no_grad():
        term = model.item_graph_term(model.item_graph_inputs()).numpy()
    np.testing.assert_allclose(placement.place(features), term, atol=1e-5)
    assert placement.weights == {"image_feat": 0.1, "text_feat": 0.9}
    one = placement.place({name: f[:1] * 3.0 for name, f in features.items()})  # the scale does not matter
    np.testing.assert_allclose(one, term[:1], atol=1e-5)
    # Without image features only the text graph places it, at the text weight.
    lacking = placement.place({"image_feat": np.zeros((1, 5)), "text_feat": features["text_feat"][:1]})
    text = placement.features["text_feat"]
    text_only = ItemPlacement(
        placement.k, {"text_feat": 1.0}, placement.ids, placement.rows, {"text_feat": text}
    )
    np.testing.assert_allclose(
        lacking, 0.9 * text_only.place({"text_feat": features["text_feat"][:1]}), atol=1e-6
    )


@pytest.mark.slow  # a real tritonserver
def test_the_rank_ensemble_serves_a_two_tower_model(tritonserver, tmp_path):
    grpc = pytest.importorskip("tritonclient.grpc")
    from export.repository import RenderConfig, render_repository
    from export.triton_launcher import TritonConfig, TritonServer

    model, out = _export("freedom", tmp_path / "export")  # the graphs of the three differ in weights only
    repo = tmp_path / "repo"
    render_repository(out, repo, RenderConfig(backend="python", max_batch_size=8))
    hist, cands, users = _requests()
    with TritonServer(TritonConfig(repo, control_mode="explicit")) as srv:
        client = grpc.InferenceServerClient(srv.grpc_url)
        inputs = []
        for name, array in (
            ("history_ids", hist),
            ("candidate_ids", cands),
            ("user_id", users.reshape(-1, 1)),
        ):
            inputs.append(grpc.InferInput(name, list(array.shape), "INT64"))
            inputs[-1].set_data_from_numpy(array)
        result = client.infer("rank", inputs, client_timeout=30)
    served, known = result.as_numpy("scores"), result.as_numpy("candidate_known")
    assert known.sum() == cands.size - 1 and not known[1, 4]
    expected = model.full_scores(torch.from_numpy(users)).gather(
        1, torch.from_numpy(cands).clamp_max(NUM_ITEMS)
    )
    np.testing.assert_allclose(served[known], expected.numpy()[known], atol=1e-5)


@pytest.mark.parametrize("backend", ["python", "onnxruntime"])
def test_publish_places_new_items_through_the_item_graph(exported, backend, tmp_path, capsys):
    from export.repository import RenderConfig, native_lookup, read_config, render_repository, table_model
    from mmrank.cli import main

    model, out = exported
    repo = tmp_path / "repo"
    render_repository(out, repo, RenderConfig(backend=backend))
    new_ids = np.array([NUM_ITEMS + 5, NUM_ITEMS + 9])
    gen = np.random.default_rng(2)
    features = {
        name: gen.standard_normal((2, dim)).astype(np.float32)
        for name, dim in (("text_feat", 6), ("image_feat", 5))
    }
    items = tmp_path / "items.npz"
    np.savez(items, ids=new_ids, **features)
    code = main(["table", "publish", "--repo", str(repo), "--items", str(items)])
    placement = ItemPlacement.read(out / "item_table")
    if placement is None:  # LightGCN: no content, no item graph
        err = capsys.readouterr().err.strip()
        assert code == 1 and err.count("\n") == 0 and "cannot place new items" in err
        return
    assert code == 0
    version = table_model(repo) / "2"
    table = it.ItemTable.read(version / "item_table")
    rows, known = table.rows_of(new_ids)
    assert known.all()
    np.testing.assert_allclose(table.item_rows[rows], placement.place(features), atol=1e-6)
    assert ItemPlacement.read(version / "item_table").k == placement.k  # carried for the next items
    config = read_config(table_model(repo))
    if config.platform == "onnxruntime_onnx":  # the version's native lookup answers as the numpy one
        native_lookup(config).check(version, 2, (0, table.item_dim))
    del features["image_feat"]
    np.savez(items, ids=new_ids + 100, **features)
    assert main(["table", "publish", "--repo", str(repo), "--items", str(items)]) == 1
    assert "the item set lacks image_feat" in capsys.readouterr().err
