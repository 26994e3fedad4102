"""Every preset builds on real data and takes a training step; gradients reach the content tower exactly
in the end-to-end presets, and never a fixed table (pe, task_pe stage 2, two-stage LEMUR)."""

import json

import numpy as np
import pytest
import torch
from trainer_data import synth_with_features

from trainer.config import PRESETS_DIR, list_presets, read_preset, resolve
from trainer.data.samples import make_samples
from trainer.data.schema import load_dataset
from trainer.losses import bce, bpr
from trainer.model.build import build_model, is_graph_model
from trainer.model.ranking_model import RankingModel
from trainer.run import build_schema, final_model_config
from trainer.train import Dist, build_content_table

BATCH = 64


@pytest.fixture(scope="module")
def world(tmp_path_factory, pytestconfig):
    """The dataset, one schema holding every input any preset reads, and a pe table for fixed sources."""
    ds = load_dataset(synth_with_features(tmp_path_factory, pytestconfig.cache))
    schema = build_schema(ds, resolve("em3").model)
    schema.tokens = build_schema(ds, resolve("lemur").model).tokens
    table_dir = tmp_path_factory.mktemp("pe_table")
    # The text features alone keep the PCA small (768 columns); any fixed table serves the presets.
    build_content_table(
        ds, resolve("pe", sets={"model.content.modalities": ["text"]}), table_dir, Dist(), None
    )
    return ds, schema, table_dir


def _step(model: RankingModel, ds, short: int, long: int) -> float:
    samples = make_samples(ds, "train", short, long)
    batch = samples.batch(samples.order(0, 0, True)[:BATCH])
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(batch)
    loss = bce(out.logits, batch.label) + sum(out.losses.values())
    loss.backward()
    return loss.item()


def _grad_norm(params) -> float:
    return sum(float(p.grad.norm()) for p in params if p.grad is not None)


def test_preset_files_are_documented():
    for name in list_presets():
        raw = read_preset(name)
        assert raw["description"] and raw["paper"], name
        assert json.loads((PRESETS_DIR / f"{name}.json").read_text()) == raw


GRAPH_PRESETS = [n for n in list_presets() if is_graph_model(resolve(n).model)]
RANKING_PRESETS = [n for n in list_presets() if n not in GRAPH_PRESETS]


@pytest.mark.slow  # `world`: the real encoders' features
@pytest.mark.parametrize("name", GRAPH_PRESETS)
def test_graph_preset_builds_and_trains_one_bpr_step(world, name):
    ds, _, _ = world
    cfg = resolve(name)
    torch.manual_seed(0)
    model = build_model(cfg.model, build_schema(ds, cfg.model)).train()
    model.new_epoch(0, 0)
    samples = make_samples(ds, "train", 1)
    batch = samples.batch(samples.order(0, 0, True)[:BATCH])
    out = model(batch, torch.randint(1, ds.num_items + 1, (BATCH,)))
    loss = bpr(out.logits, out.negative_logits) + sum(out.losses.values())
    loss.backward()
    assert np.isfinite(loss.item()) and model.item_emb.weight.grad.abs().sum() > 0
    if name == "em3_mmrec":
        assert _grad_norm(model.content_module().parameters()) > 0 and "cic" in out.losses


@pytest.mark.slow  # `world`: the real encoders' features, then a step per preset
@pytest.mark.parametrize("name", RANKING_PRESETS)
def test_preset_builds_and_trains_one_step(world, name):
    ds, schema, table_dir = world
    cfg = resolve(name)
    torch.manual_seed(0)
    model_cfg = final_model_config(cfg, table_dir)
    model = RankingModel(model_cfg, schema)
    loss = _step(model, ds, model_cfg.interest.short_len, model_cfg.interest.long_len)
    assert np.isfinite(loss)
    ranker_grads = _grad_norm(model.ranker.parameters())
    assert ranker_grads > 0
    tower = model.tower
    if name.startswith("id_only") or name == "bpr":
        assert tower is None
        return
    if model_cfg.content.source == "fixed":  # pe, task_pe and two-stage LEMUR train on a frozen table
        assert not any(p.requires_grad for p in tower.parameters())
        return
    assert _grad_norm(tower.parameters()) > 0, "no gradient reached the content tower"
    if model_cfg.content.encoder_mode == "trainable":
        top = tower.text.encoder.model.encoder.layer[-1]
        assert _grad_norm(top.parameters()) > 0, "no gradient reached the trainable MiniLM layers"
        assert all(p.grad is None for p in tower.text.encoder.model.embeddings.parameters())
    elif name.startswith("lemur"):
        assert tower.text is None  # stop-gradient: the encoder is not in the loop
    if cfg.train.lora_epochs:
        model.start_lora_phase()
        assert np.isfinite(_step(model, ds, cfg.train.lora_history_len, model_cfg.interest.long_len))
        trained = [n for n, p in tower.named_parameters() if p.grad is not None and float(p.grad.norm()) > 0]
        assert trained and all("lora_" in n for n in trained), trained


@pytest.mark.slow
def test_pe_table_is_built_for_the_run(world):
    ds, schema, table_dir = world
    table = np.load(table_dir / "content_table.npy")
    assert table.shape == (ds.num_items + 1, resolve("pe").model.content.d)
    assert not table[0].any() and np.isfinite(table).all()
    assert table[1:].std(0).min() > 0  # every component varies across items


@pytest.mark.slow
def test_stop_gradient_cuts_the_ranking_loss_from_the_tower_but_not_sqdc(world):
    ds, schema, _ = world
    cfg = resolve("lemur_stop_gradient")
    torch.manual_seed(0)
    model = RankingModel(cfg.model, schema).train()
    samples = make_samples(ds, "train", cfg.model.interest.short_len, cfg.model.interest.long_len)
    batch = samples.batch(samples.order(0, 0, True)[:BATCH])
    out = model(batch)
    tower = [p for p in model.tower.parameters() if p.requires_grad]
    ranking = torch.autograd.grad(bce(out.logits, batch.label), tower, retain_graph=True, allow_unused=True)
    assert all(g is None or float(g.abs().sum()) == 0 for g in ranking)
    sqdc = torch.autograd.grad(out.losses["sqdc"], tower, allow_unused=True)
    assert sum(0.0 if g is None else float(g.abs().sum()) for g in sqdc) > 0


def test_two_stage_lemur_pretrains_stage_one_with_sqdc_alone():
    from trainer.train import stage1_config

    cfg = resolve("lemur_two_stage")
    stage = stage1_config(cfg)
    assert stage.model.loss.main == "none" and stage.model.loss.sqdc_lambda > 0 and not stage.train.task_pe
    assert cfg.model.loss.main == "bce"  # stage 2 ranks with the usual loss
