"""The synthetic generator: deterministic, chunk-invariant, schema-valid, with a learnable planted signal."""

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import OneHotEncoder

from common.errors import DataError, MMRankError
from mmrank.cli import main
from trainer.data.schema import MANIFEST, Manifest, load_dataset, read_events
from trainer.data.synth import ATTRIBUTES, COLOURS, SHAPES, THEMES, SynthConfig, generate

SMALL = SynthConfig(users=300, items=400, events=30_000, image_size=16, seed=3)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "ds"
    generate(out, SMALL)
    return load_dataset(out)


def test_same_seed_same_bytes_other_seed_differs(small, tmp_path):
    generate(tmp_path / "again", SMALL)
    assert _files(tmp_path / "again") == _files(small.root)
    generate(tmp_path / "other", replace(SMALL, seed=4))
    other = load_dataset(tmp_path / "other")
    assert not other.events[["user_id", "item_id", "label"]].equals(
        small.events[["user_id", "item_id", "label"]]
    )
    assert not other.items["title"].equals(small.items["title"])
    assert (tmp_path / "other" / "items.parquet").read_bytes() != (small.root / "items.parquet").read_bytes()


def test_small_chunks_give_the_same_data(small, tmp_path):
    generate(tmp_path / "chunked", replace(SMALL, chunk_events=1))
    parts = sorted((tmp_path / "chunked" / "events").glob("part-*.parquet"))
    assert len(parts) > 1 and len(list((small.root / "events").glob("*.parquet"))) == 1
    pd.testing.assert_frame_equal(read_events(tmp_path / "chunked"), read_events(small.root))
    for table in ("items.parquet", "users.parquet"):
        assert (tmp_path / "chunked" / table).read_bytes() == (small.root / table).read_bytes()
    assert Manifest.read(tmp_path / "chunked").counts == small.manifest.counts


def test_follows_the_canonical_schema(small):
    m, ev = small.manifest, small.events
    assert m.source == "synth" and m.seed == SMALL.seed and m.has_images
    assert m.text_fields == ["title", "description"]
    assert set(m.item_categoricals) == {"category", "style"} and set(m.user_features) == {
        "age_bucket",
        "region",
    }
    assert small.items["item_id"].tolist() == list(range(1, SMALL.items + 1))
    assert small.users["user_id"].tolist() == list(range(1, SMALL.users + 1))
    assert (small.items["created_at"].diff().dropna() >= 0).all()
    c = m.counts
    assert c["events"] == len(ev) == SMALL.events
    assert c["train"] + c["valid"] + c["test"] == c["events"]
    assert c["positives"] == int(ev["label"].sum())
    assert 0.1 < c["positives"] / c["events"] < 0.5
    assert m.notes["generator"]["seed"] == SMALL.seed
    image = Image.open(io.BytesIO(small.items["image"].iloc[0]))
    assert image.format == "PNG" and image.size == (16, 16) and image.mode == "RGB"


def test_splits_are_by_time_and_requests_are_consistent(small):
    ev, s = small.events, small.manifest.splits
    train, valid, test = (small.split(name)["ts"] for name in ("train", "valid", "test"))
    assert train.max() < s["valid_start_ts"] <= valid.min() <= valid.max() < s["test_start_ts"] <= test.min()
    per_request = ev.groupby("request_id").agg(users=("user_id", "nunique"), times=("ts", "nunique"))
    assert (per_request["users"] == 1).all() and (per_request["times"] == 1).all()
    assert ev.groupby("request_id").size().max() == SMALL.candidates_per_request
    created = small.items["created_at"].to_numpy()[ev["item_id"].to_numpy() - 1]
    assert (created <= ev["ts"].to_numpy()).all(), "an item was shown before it existed"


def test_valid_and_test_hold_cold_start_items(small):
    train_items = set(small.split("train")["item_id"])
    created = small.items.set_index("item_id")["created_at"]
    for name, key in (("valid", "cold_valid_events"), ("test", "cold_test_events")):
        events = small.split(name)
        cold = ~events["item_id"].isin(train_items)
        assert cold.sum() == small.manifest.counts[key] > 0.05 * len(events)
        # Items created after the train boundary are shown, and never in training.
        new = events["item_id"][
            created.loc[events["item_id"]].to_numpy() >= small.manifest.splits["valid_start_ts"]
        ]
        assert new.nunique() > 5 and not set(new) & train_items


def test_content_renders_the_latent_attributes(small):
    items = small.items
    themes, shapes = list(THEMES.values()), set(SHAPES)
    for title, description, theme in zip(
        items["title"], items["description"], items["latent_theme"], strict=True
    ):
        assert set(title.split()) & set(themes[theme]), title
        assert not set((title + " " + description).replace(".", "").split()) & shapes
    palette = np.array([rgb for rgb, _ in COLOURS.values()], dtype=np.float64)
    palette = np.concatenate([palette, 0.35 * palette])
    hits = 0
    for blob, colour in zip(items["image"], items["latent_colour"], strict=True):
        pixels = np.asarray(Image.open(io.BytesIO(blob)), dtype=np.float64).reshape(-1, 3)
        pixels = pixels[np.ptp(pixels, axis=1) > 60]  # the shape, not the grey background
        nearest = ((pixels[:, None, :] - palette[None]) ** 2).sum(-1).argmin(1) % len(COLOURS)
        hits += np.bincount(nearest, minlength=len(COLOURS)).argmax() == colour
    assert hits / len(items) > 0.95


def _match_features(ds, events: pd.DataFrame) -> np.ndarray:
    """taste[user, a, attr_a(item)] per latent attribute: the planted signal."""
    users, items = events["user_id"].to_numpy() - 1, events["item_id"].to_numpy() - 1
    cols = []
    for name in ATTRIBUTES:
        taste = np.stack(ds.users[f"latent_taste_{name}"].to_numpy())[users]
        cols.append(taste[np.arange(len(events)), ds.items[f"latent_{name}"].to_numpy()[items]])
    return np.stack(cols, axis=1)


def _categorical_crosses(ds, events: pd.DataFrame) -> np.ndarray:
    """What the ids alone say: user features crossed with each item categorical."""
    users = ds.users.iloc[events["user_id"].to_numpy() - 1]
    items = ds.items.iloc[events["item_id"].to_numpy() - 1]
    segment = users["age_bucket"].to_numpy() * 10 + users["region"].to_numpy()
    return np.stack(
        [segment * 10 + items["category"].to_numpy(), segment * 10 + items["style"].to_numpy()], 1
    )


def test_planted_signal_is_learnable_and_beats_the_ids(small):
    train, test = small.split("train"), small.split("test")
    latent = LogisticRegression().fit(_match_features(small, train), train["label"])
    p_latent = latent.predict_proba(_match_features(small, test))[:, 1]
    enc = OneHotEncoder(handle_unknown="ignore").fit(_categorical_crosses(small, train))
    ids = LogisticRegression(max_iter=1000).fit(
        enc.transform(_categorical_crosses(small, train)), train["label"]
    )
    p_ids = ids.predict_proba(enc.transform(_categorical_crosses(small, test)))[:, 1]
    auc_latent, auc_ids = roc_auc_score(test["label"], p_latent), roc_auc_score(test["label"], p_ids)
    assert auc_latent > 0.75
    assert auc_latent > auc_ids + 0.1, "the content signal should matter more than the categorical ids"
    cold = ~test["item_id"].isin(set(train["item_id"])).to_numpy()
    assert roc_auc_score(test["label"][cold], p_latent[cold]) > 0.75


def test_non_empty_output_needs_force_and_is_left_untouched(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="--force"):
        generate(out, SMALL)
    assert _files(out) == {"keep.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    generate(out, replace(SMALL, events=8_000), force=True)
    assert (out / MANIFEST).is_file() and not (out / "keep.txt").exists()


@pytest.mark.parametrize(
    "field", ["users", "items", "events", "image_size", "chunk_events", "candidates_per_request"]
)
@pytest.mark.parametrize("value", [0, -5])
def test_non_positive_sizes_are_rejected(field, value):
    with pytest.raises(MMRankError, match=f"{field} must be a positive integer"):
        SynthConfig(**{field: value})


def test_too_few_events_fail_without_writing(tmp_path):
    with pytest.raises(MMRankError, match="split"):
        generate(tmp_path / "ds", replace(SMALL, events=3))
    assert list(tmp_path.iterdir()) == []


def test_cli_builds_and_reports_errors_in_one_line(tmp_path, capsys):
    out = tmp_path / "ds"
    args = ["data", "synth", "--out", str(out), "--users", "50", "--items", "60", "--events", "4000"]
    assert main([*args, "--image-size", "8", "--seed", "7"]) == 0
    assert "4000 events" in capsys.readouterr().out
    assert Manifest.read(out).seed == 7 and load_dataset(out).manifest.counts["events"] == 4000
    assert main(args) == 1
    assert main([*args, "--force", "--users", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "--force" in err[0] and "users must be a positive integer" in err[1] and len(err) == 2
