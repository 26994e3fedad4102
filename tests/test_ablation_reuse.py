"""`mmrank ablation` reuses a finished run only when its config.json is the config the command resolves;
checked on hand-written finished runs, so nothing trains."""

import json

import pytest

from mmrank.errors import MMRankError
from trainer.ablation import run_ablation, run_path
from trainer.config import resolve
from trainer.data.schema import MANIFEST, Manifest
from trainer.run import CONFIG, METRICS

SETS = {"train.log_every": 100}


@pytest.fixture
def data(tmp_path):
    """A dataset folder holding only its manifest: all the ablation reads before training."""
    root = tmp_path / "data"
    root.mkdir()
    manifest = Manifest(
        name="tiny",
        source="test",
        seed=0,
        label_rule="none",
        counts={"items": 3, "users": 2, "events": 6},
        splits={"valid_start_ts": 200, "test_start_ts": 300},
        text_fields=[],
        item_categoricals={},
        user_features={},
        has_images=False,
    )
    (root / MANIFEST).write_text(manifest.to_json())
    return root


def finished_run(out, seed: int, max_steps: int) -> None:
    """A run folder as `mmrank ablation ... --max-steps max_steps` leaves it for id_only."""
    run_dir = run_path(out, "id_only", seed)
    run_dir.mkdir(parents=True)
    cfg = resolve("id_only", sets=SETS, seed=seed, max_steps=max_steps)
    (run_dir / CONFIG).write_text(cfg.to_json())
    metrics = {"valid": {}, "test": {"auc": [0.6, 0.61][seed]}, "train": {"steps": max_steps, "best_step": 2}}
    (run_dir / METRICS).write_text(json.dumps(metrics))


def test_a_finished_run_with_the_same_config_is_tabulated(data, tmp_path):
    out = tmp_path / "ablation"
    for seed in (0, 1):
        finished_run(out, seed, max_steps=3)
    run_ablation(data, ["id_only"], [0, 1], out, SETS, max_steps=3)
    results = json.loads((out / "ablation.json").read_text())["results"]["id_only"]
    assert [r["test"]["auc"] for r in results] == [0.6, 0.61]


def test_a_finished_run_with_another_config_is_refused_naming_the_keys(data, tmp_path):
    out = tmp_path / "ablation"
    for seed in (0, 1):
        finished_run(out, seed, max_steps=3)
    with pytest.raises(MMRankError) as info:
        run_ablation(data, ["id_only"], [0, 1], out, {**SETS, "train.batch_size": 64}, max_steps=5)
    message = str(info.value)
    assert "seed0: a finished run trained with another config" in message
    assert "train.batch_size: 256 there, 64 now" in message and "train.max_steps: 3 there, 5 now" in message
    assert not (out / "ablation.md").exists()
