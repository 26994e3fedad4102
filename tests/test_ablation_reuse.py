"""`mmrank ablation` reuses a finished run (or resumes an unfinished one) only when it was trained with the
config the command resolves and on its dataset; checked on hand-written run folders, so nothing trains."""

import json

import pytest

from common.errors import MMRankError
from trainer.ablation import check_reusable, run_ablation, run_path
from trainer.config import resolve
from trainer.data.schema import MANIFEST, Manifest
from trainer.run import CONFIG, METRICS, data_identity, write_record

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


def finished_run(out, seed: int, max_steps: int, data) -> None:
    """A run folder as `mmrank ablation ... --max-steps max_steps` leaves it for id_only, trained on the
    dataset folder `data`."""
    run_dir = run_path(out, "id_only", seed)
    run_dir.mkdir(parents=True)
    cfg = resolve("id_only", sets=SETS, seed=seed, max_steps=max_steps)
    (run_dir / CONFIG).write_text(cfg.to_json())
    write_record(run_dir, data_identity(data))
    train = {"steps": max_steps, "best_step": 2, "data": str(data.resolve())}
    metrics = {"valid": {}, "test": {"auc": [0.6, 0.61][seed]}, "train": train}
    (run_dir / METRICS).write_text(json.dumps(metrics))


def test_a_finished_run_with_the_same_config_is_tabulated(data, tmp_path):
    out = tmp_path / "ablation"
    for seed in (0, 1):
        finished_run(out, seed, max_steps=3, data=data)
    run_ablation(data, ["id_only"], [0, 1], out, SETS, max_steps=3)
    results = json.loads((out / "ablation.json").read_text())["results"]["id_only"]
    assert [r["test"]["auc"] for r in results] == [0.6, 0.61]


def test_a_finished_run_with_another_config_is_refused_naming_the_keys(data, tmp_path):
    out = tmp_path / "ablation"
    for seed in (0, 1):
        finished_run(out, seed, max_steps=3, data=data)
    with pytest.raises(MMRankError) as info:
        run_ablation(data, ["id_only"], [0, 1], out, {**SETS, "train.batch_size": 64}, max_steps=5)
    message = str(info.value)
    assert "seed0: a finished run trained with another config" in message
    assert "train.batch_size: 256 there, 64 now" in message and "train.max_steps: 3 there, 5 now" in message
    assert not (out / "ablation.md").exists()


def test_a_finished_run_on_another_dataset_is_refused(data, tmp_path):
    out = tmp_path / "ablation"
    finished_run(out, 0, max_steps=3, data=data)
    run_ablation(data, ["id_only"], [0], out, SETS, max_steps=3)  # the folder it names: reused
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / MANIFEST).write_bytes((data / MANIFEST).read_bytes())
    with pytest.raises(
        MMRankError,
        match=f"a finished run trained on {data.resolve()} .manifest sha256 [0-9a-f]{{12}}., not on "
        f"{tmp_path / 'other'}",
    ):
        run_ablation(tmp_path / "other", ["id_only"], [0], out, SETS, max_steps=3)
    # run.json names the manifest too: the same folder rebuilt with other data is another dataset.
    identity = data_identity(data)
    write_record(run_path(out, "id_only", 0), {**identity, "manifest_sha256": "0" * 64})
    with pytest.raises(
        MMRankError, match=r"\(manifest sha256 000000000000\), not on .*its metrics.json would"
    ):
        run_ablation(data, ["id_only"], [0], out, SETS, max_steps=3)


def test_an_unfinished_run_with_another_config_is_refused_before_anything_trains(data, tmp_path):
    out = tmp_path / "ablation"
    unfinished = run_path(out, "id_only", 1)
    unfinished.mkdir(parents=True)
    (unfinished / CONFIG).write_text(
        resolve("id_only", sets={**SETS, "train.batch_size": 64}, seed=1).to_json()
    )
    write_record(unfinished, data_identity(data))
    with pytest.raises(MMRankError) as info:
        run_ablation(data, ["id_only"], [0, 1], out, SETS)
    assert (
        "seed1: an unfinished run trained with another config (train.batch_size: 64 there, 256 now)"
        in str(info.value)
    )
    assert "resuming it would make it this command's result" in str(info.value)
    assert not run_path(out, "id_only", 0).exists()
    # When to stop is what a resumed run may change.
    check_reusable(
        unfinished,
        resolve("id_only", sets={**SETS, "train.batch_size": 64}, seed=1, max_steps=9),
        data_identity(data),
    )
