"""Checkpoint files: atomic writes, clear errors for damaged files, RNG state round trips."""

import random

import numpy as np
import pytest
import torch
from torch import nn

from common.errors import MMRankError
from trainer import checkpoint
from trainer.checkpoint import TrainState


def _model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    model.register_buffer("bank", torch.randn(5, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(6, 4)).sum().backward()
    opt.step()
    return model, opt


def _save(path, model, opt, state=None):
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    checkpoint.save_last(path, model, opt, scaler, state or TrainState(), [checkpoint.rng_state()])


def test_last_checkpoint_round_trips_everything(tmp_path):
    model, opt = _model_and_optimizer()
    state = TrainState(
        epoch=2,
        batch_in_epoch=5,
        global_step=17,
        best_metric=0.71,
        best_valid={"auc": 0.71},
        windows=[{"window": "train1", "auc": None}],
    )
    _save(tmp_path / "last.pt", model, opt, state)
    ckpt = checkpoint.load(tmp_path / "last.pt", ("model", "optimizer", "scaler", "state", "rng"))
    assert TrainState.from_dict(ckpt["state"]) == state
    fresh, fresh_opt = _model_and_optimizer(seed=1)
    checkpoint.load_model_state(fresh, ckpt["model"], "last.pt")
    fresh_opt.load_state_dict(ckpt["optimizer"])
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert fresh_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_rng_state_restores_every_generator():
    state = checkpoint.rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3), np.random.randn())
    checkpoint.set_rng_state(state)
    second = (random.random(), np.random.rand(), torch.rand(3), np.random.randn())
    assert first[0] == second[0] and first[1] == second[1] and first[3] == second[3]
    torch.testing.assert_close(first[2], second[2], rtol=0, atol=0)


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    model, opt = _model_and_optimizer()
    path = tmp_path / "last.pt"
    _save(path, model, opt, TrainState(global_step=3))
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        _save(path, model, opt, TrainState(global_step=4))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left behind


def test_damaged_and_foreign_files_are_one_line_errors(tmp_path):
    model, opt = _model_and_optimizer()
    path = tmp_path / "last.pt"
    _save(path, model, opt)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(MMRankError, match="unreadable checkpoint") as err:
        checkpoint.load(path)
    assert "\n" not in str(err.value)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(MMRankError, match="not a mmrank checkpoint"):
        checkpoint.load(tmp_path / "foreign.pt")
    with pytest.raises(MMRankError, match="checkpoint not found"):
        checkpoint.load(tmp_path / "missing.pt")
    _save(path, model, opt)
    with pytest.raises(MMRankError, match="lacks resume_point"):
        checkpoint.load(path, ("model", "resume_point"))


def test_a_checkpoint_of_another_format_is_refused_naming_both_versions(tmp_path):
    model, opt = _model_and_optimizer()
    path = tmp_path / "last.pt"
    _save(path, model, opt)
    ckpt = checkpoint.load(path)
    checkpoint.save_atomic({**ckpt, "format": 1}, path)
    with pytest.raises(MMRankError) as err:
        checkpoint.load(path)
    assert str(err.value) == (
        f"{path}: checkpoint format 1, this version reads format {checkpoint.FORMAT_VERSION}; train the run again"
    )
    # A train state with other fields than this format's (a field missing, an unknown one) is refused too.
    state = {k: v for k, v in ckpt["state"].items() if k != "log_lines"} | {"stale": 1}
    checkpoint.save_atomic({**ckpt, "state": state}, path)
    with pytest.raises(
        MMRankError, match=r"last.pt: train state fields .* missing \['log_lines'\], unknown \['stale'\]"
    ):
        checkpoint.load(path, ("state",), mmap=True)


def test_checkpoint_of_another_model_is_rejected(tmp_path):
    model, opt = _model_and_optimizer()
    checkpoint.save_best(tmp_path / "best.pt", model, TrainState())
    other = nn.Sequential(nn.Linear(4, 9), nn.ReLU(), nn.Linear(9, 1))
    with pytest.raises(MMRankError, match="does not match the model config"):
        checkpoint.load_model_state(
            other, checkpoint.load(tmp_path / "best.pt")["model"], tmp_path / "best.pt"
        )
