"""BPR's sampled negatives in the training loop: scored in the positives' forward, they are candidates
and not training targets (never marked known, one step counted), in one process and under DDP."""

from pathlib import Path

import numpy as np
import pytest
import torch
from ddp_replicas import train_replicas
from trainer_data import mmrec_toy

from trainer.config import resolve
from trainer.data.schema import load_dataset
from trainer.run import data_identity
from trainer.train import Dist, Trainer, open_run_dir

QUIET = {"train.log_every": 10_000, "train.lora_epochs": 0}
# em3's content tower with the memory bank (and so the staleness probe), trained with BPR.
CONTENT_BPR = {
    **QUIET,
    "model.loss.main": "bpr",
    "model.content.modalities": ["text_feat"],
    "model.interest.memory_bank": True,
}


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """MMRec-format data whose valid and test positives are items 50-59, never a train positive."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(20):
        train = rng.choice(50, 8, replace=False)
        held = rng.choice(np.arange(50, 60), 4, replace=False)
        rows += [(u, int(i), k, 0) for k, i in enumerate(train)]
        rows += [(u, int(i), 8 + k, 1 + k // 2) for k, i in enumerate(held)]
    return mmrec_toy(tmp_path_factory, rows, rng, neg_ratio=1)


class FixedNegatives:
    """The negative sampler's interface, drawing the given items."""

    def __init__(self, items: list[int]):
        self.items = torch.tensor(items)

    def sample(self, users: torch.Tensor) -> torch.Tensor:
        return self.items.to(users.device)


def _trainer(data: Path, out: Path, sets: dict, preset: str = "bpr") -> Trainer:
    cfg = resolve(preset, sets=sets)
    open_run_dir(out, cfg, False, Dist(), data_identity(data))
    return Trainer(cfg, load_dataset(data), out, Dist(), False, False)


def _cold_items(data: Path) -> list[int]:
    ds = load_dataset(data)
    train = ds.split("train")
    positives = set(train[train["label"] == 1]["item_id"].tolist())
    return sorted(set(range(1, ds.num_items + 1)) - positives)


@pytest.mark.parametrize("preset, sets", [("bpr", QUIET), ("em3", CONTENT_BPR)], ids=["mf", "content"])
def test_a_bpr_step_marks_only_its_positives_known_and_counts_one_step(toy, tmp_path, preset, sets):
    trainer = _trainer(toy, tmp_path / "run", sets, preset)
    batch = trainer.samples("train").batch(np.arange(3))
    positives = batch.item_id.tolist()
    cold = _cold_items(toy)
    assert len(cold) >= 2 and not set(cold) & set(positives)
    other = next(i for i in range(1, 50) if i not in positives and i not in cold)
    trainer.negatives = FixedNegatives([cold[0], other, cold[1]])
    values, _ = trainer._step(batch)
    model = trainer.model
    assert model.ranker.item_known.nonzero().flatten().tolist() == sorted(set(positives))
    assert int(model.train_steps) == 1 and np.isfinite(values["bpr"])
    if model.bank is not None:
        assert model.bank.written_step[[*positives, cold[0], other, cold[1]]].eq(0).all()


@pytest.mark.slow  # two training processes
def test_ddp_bpr_keeps_replicas_identical_and_negatives_unknown(toy, tmp_path):
    sets = {**CONTENT_BPR, "train.epochs": 1, "train.max_steps": 3, "train.batch_size": 16}
    states = train_replicas(toy, tmp_path, "em3", sets)
    for name, value in states[0].items():
        torch.testing.assert_close(value, states[1][name], rtol=0, atol=0, msg=name)
    known = states[0]["ranker.item_known"].nonzero().flatten().tolist()
    assert known and not set(known) & set(_cold_items(toy))
    assert int(states[0]["train_steps"]) == 3 and int(states[0]["bank.written_step"].max()) == 2
