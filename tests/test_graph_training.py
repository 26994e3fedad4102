"""The graph presets (lightgcn, freedom, em3_mmrec) through the trainer on small MMRec-format data:
whatever item features the data has, per-epoch progress, determinism under a seed, an exact resume
across FREEDOM's per-epoch pruned graphs, `mmrank evaluate`, and configs they refuse."""

import json

import numpy as np
import pytest
import torch

from common.errors import MMRankError
from trainer import checkpoint
from trainer.config import resolve
from trainer.data.mmrec import MMRecConfig, build_mmrec
from trainer.data.schema import load_dataset
from trainer.run import build_schema, load_run
from trainer.train import evaluate_run, train

pytestmark = pytest.mark.slow  # training runs

GRAPH_PRESETS = ("lightgcn", "freedom", "em3_mmrec")
SMALL = {"train.batch_size": 64, "train.log_every": 10_000, "model.graph.knn_k": 4}


def _mmrec(root, features: dict[str, int]):
    """40 users x 60 items, 10 interactions each (8 train, 1 valid, 1 test), the named feature files."""
    rng = np.random.default_rng(0)
    src = root / "src"
    src.mkdir()
    with open(src / "toy.inter", "w") as f:
        f.write("userID\titemID\tx_label\n")
        for u in range(40):
            for k, i in enumerate(rng.choice(60, 10, replace=False)):
                f.write(f"{u}\t{i}\t{0 if k < 8 else k - 7}\n")
    for name, dim in features.items():
        np.save(src / f"{name}.npy", rng.normal(size=(60, dim)).astype(np.float32))
    build_mmrec(src, root / "ds", MMRecConfig(name="toy", neg_ratio=1))
    return root / "ds"


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    return _mmrec(tmp_path_factory.mktemp("both"), {"text_feat": 12, "image_feat": 20})


def _cfg(preset, **sets):
    return resolve(preset, sets={**SMALL, **sets})


@pytest.mark.parametrize(
    "features", [{"text_feat": 12}, {"image_feat": 20}, {"text_feat": 12, "image_feat": 20}], ids=str
)
def test_the_item_graph_reads_whatever_features_the_data_has(tmp_path, features):
    data = _mmrec(tmp_path, features)
    _, model = _trained(data, tmp_path / "run", "em3_mmrec", epochs=1)
    assert model.modality_names == sorted(features)
    assert set(model.token_proj) == set(features)


def _trained(data, out, preset, epochs, **sets):
    train(data, _cfg(preset, **{"train.epochs": epochs, **sets}), out, progress=False)
    return load_run(out, load_dataset(data))


@pytest.mark.threads(1)
@pytest.mark.parametrize("preset", GRAPH_PRESETS)
def test_a_graph_preset_trains_reports_each_epoch_and_repeats_under_its_seed(both, tmp_path, preset, capsys):
    metrics = [
        train(both, _cfg(preset, **{"train.epochs": 3}), tmp_path / f"r{i}", progress=False) for i in (0, 1)
    ]
    assert metrics[0]["test"] == metrics[1]["test"] and metrics[0]["valid"] == metrics[1]["valid"]
    a = checkpoint.load(tmp_path / "r0" / "best.pt")["model"]
    b = checkpoint.load(tmp_path / "r1" / "best.pt")["model"]
    assert a.keys() == b.keys()
    for name, value in a.items():
        torch.testing.assert_close(value, b[name], rtol=0, atol=0, msg=name)
    assert {"recall@10", "recall@20", "ndcg@10", "ndcg@20"} <= set(metrics[0]["test"])
    log = [json.loads(x) for x in (tmp_path / "r0" / "train_log.jsonl").read_text().splitlines()]
    valid = [x for x in log if x["event"] == "valid"]
    assert [x["epoch"] for x in valid] == [1, 2, 3]
    assert all(x["train_s"] > 0 and x["valid_s"] > 0 and x["train_loss"] > 0 for x in valid)
    assert "epoch 3 step 15: train" in capsys.readouterr().err  # 320 train positives / 64 per batch
    evaluated = evaluate_run(tmp_path / "r0", both)
    assert evaluated["test"]["recall@20"] == pytest.approx(metrics[0]["test"]["recall@20"], abs=1e-9)


@pytest.mark.threads(1)
def test_freedom_resumed_mid_epoch_redraws_that_epochs_graph(both, tmp_path):
    sets = {"train.epochs": 3}
    train(both, _cfg("freedom", **sets), tmp_path / "whole", progress=False)
    first = train(both, _cfg("freedom", **sets, **{"train.max_steps": 7}), tmp_path / "split", progress=False)
    assert first["train"]["stopped"] == "max_steps"
    train(both, _cfg("freedom", **sets), tmp_path / "split", resume=True, progress=False)
    a = checkpoint.load(tmp_path / "whole" / "last.pt")["model"]
    b = checkpoint.load(tmp_path / "split" / "last.pt")["model"]
    for name, value in a.items():
        torch.testing.assert_close(value, b[name], rtol=0, atol=0, msg=name)


def test_graph_models_refuse_what_they_cannot_train(both, tmp_path):
    with pytest.raises(MMRankError, match="trains with model.loss.main='bpr'"):
        train(both, _cfg("freedom", **{"model.loss.main": "bce"}), tmp_path / "bce")
    with pytest.raises(MMRankError, match="no train.lora_epochs schedule"):
        train(both, _cfg("lightgcn", **{"train.lora_epochs": 1}), tmp_path / "lora")
    with pytest.raises(MMRankError, match=r"the dataset has \['image_feat', 'text_feat'\], not \['audio'\]"):
        build_schema(load_dataset(both), _cfg("freedom", **{"model.graph.modalities": ["audio"]}).model)
