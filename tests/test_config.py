"""Run-config resolution: defaults, presets (with base chains), config files, --set overrides, flags."""

import json

import pytest

from common.errors import MMRankError
from trainer.config import (
    RunConfig,
    apply_overrides,
    from_dict,
    list_presets,
    parse_sets,
    preset_overrides,
    resolve,
    validate,
)


def test_defaults_round_trip_through_json():
    cfg = resolve()
    assert cfg == RunConfig()
    assert from_dict(json.loads(cfg.to_json())) == cfg
    assert isinstance(cfg.model.content.modalities, tuple)


def test_preset_applies_its_base_chain_then_its_own_overrides():
    em3, no_cic = resolve("em3"), resolve("em3_no_cic")
    assert em3.model.loss.cic_alpha == 0.1 and em3.train.lora_epochs == 1
    assert no_cic.model.loss.cic_alpha == 0.0
    assert no_cic.model.interest.lora_rank == em3.model.interest.lora_rank  # inherited from em3
    assert no_cic.preset == "em3_no_cic" and "Contrastive" in no_cic.description
    assert preset_overrides("em3_no_cic")["model.loss.cic_alpha"] == 0.0


def test_set_overrides_parse_json_else_strings_and_coerce_tuples():
    sets = parse_sets(
        [
            "train.batch_size=64",
            "model.content.modalities=text",
            "train.amp=off",
            "model.ranker.hidden=[32, 16]",
            "model.content.fixed_table=null",
        ]
    )
    assert sets == {
        "train.batch_size": 64,
        "model.content.modalities": "text",
        "train.amp": "off",
        "model.ranker.hidden": [32, 16],
        "model.content.fixed_table": None,
    }
    cfg = resolve("em3", sets=sets)
    assert cfg.train.batch_size == 64
    assert cfg.model.content.modalities == ("text",)
    assert cfg.model.ranker.hidden == (32, 16)
    assert resolve(sets={"train.lr_ranker": 1}).train.lr_ranker == 1.0  # an int is a valid float


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ({"train.bogus": 1}, "unknown config key 'train.bogus'"),
        ({"model.content.nope.deeper": 1}, "unknown config key 'model.content.nope'"),
        ({"train": 1}, "'train' is a section"),
        ({"train.batch_size": "big"}, "config key 'train.batch_size': expected int"),
        ({"train.streaming": 1}, "config key 'train.streaming': expected bool"),
        ({"train.epochs": 2.5}, "expected int"),
    ],
)
def test_bad_overrides_name_the_key(sets, message):
    with pytest.raises(MMRankError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve(sets=sets)


def test_set_without_equals_is_an_error():
    with pytest.raises(MMRankError, match="expected KEY=VALUE"):
        parse_sets(["train.epochs"])


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(MMRankError, match="unknown preset 'nope'.*em3"):
        resolve("nope")


def test_config_file_is_merged_and_can_name_a_preset(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"preset": "em3", "seed": 7, "train": {"batch_size": 32}}))
    cfg = resolve(config_file=path)
    assert cfg.preset == "em3" and cfg.seed == 7 and cfg.train.batch_size == 32
    assert cfg.model.loss.cic_alpha == 0.1  # from the preset
    # A run's config.json reproduces the run; flags still win.
    full = tmp_path / "config.json"
    full.write_text(cfg.to_json())
    again = resolve(config_file=full, seed=3, epochs=9, max_steps=11)
    assert again.seed == 3 and again.train.epochs == 9 and again.train.max_steps == 11
    assert again.model == cfg.model


def test_config_file_errors(tmp_path):
    with pytest.raises(MMRankError, match="config file not found"):
        resolve(config_file=tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(MMRankError, match="not valid JSON"):
        resolve(config_file=bad)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"model": {"content": {"dd": 3}}}))
    with pytest.raises(MMRankError, match="unknown config key 'model.content.dd'"):
        resolve(config_file=unknown)


def test_apply_overrides_does_not_mutate_its_input():
    tree = RunConfig().to_dict()
    apply_overrides(tree, {"train.epochs": 5}, "test")
    assert tree["train"]["epochs"] == RunConfig().train.epochs


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ({"train.amp": "fp8"}, "train.amp"),
        ({"train.early_stop_metric": "accuracy"}, "early_stop_metric"),
        ({"train.batch_size": 0}, "batch_size must be positive"),
        ({"train.lora_epochs": 1}, "lora_rank"),
        ({"train.streaming": True, "train.task_pe": True}, "streaming"),
        ({"model.content.source": "fixed", "train.lora_epochs": 1, "model.interest.lora_rank": 4}, "fixed"),
    ],
)
def test_validate_rejects_inconsistent_values(sets, message):
    with pytest.raises(MMRankError, match=message):
        validate(resolve(sets=sets))


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ({"model.interest.short_len": 0}, "model.interest.short_len must be >= 1, got 0"),
        ({"model.interest.decoder_queries": 0}, "model.interest.decoder_queries must be >= 1, got 0"),
        ({"model.loss.cic_tau": 0.0}, "model.loss.cic_tau must be > 0, got 0.0"),
        ({"model.loss.cic_tau": -0.1}, "model.loss.cic_tau must be > 0, got -0.1"),
        ({"model.interest.similarity_topk": -1}, "model.interest.similarity_topk must be >= 0, got -1"),
        ({"model.interest.long_len": -5}, "model.interest.long_len must be >= 0"),
        ({"model.loss.sqdc_scale": 0}, "model.loss.sqdc_scale must be > 0"),
        ({"model.loss.sqdc_lambda": -0.1}, "model.loss.sqdc_lambda must be >= 0"),
        ({"model.content.dropout": 1.0}, "model.content.dropout must be in [0, 1), got 1.0"),
        ({"model.ranker.hidden": [64, 0]}, "model.ranker.hidden: every width must be >= 1, got [64, 0]"),
        ({"model.interest.attention_heads": 0}, "model.interest.attention_heads must be >= 1"),
        (
            {"model.interest.decoder_heads": 3},
            "model.interest.decoder_heads=3 must divide model.content.d=64",
        ),
        ({"model.content.fusion_heads": 0}, "model.content.fusion_heads must be >= 1"),
        ({"train.lr_ranker": -1e-3}, "train.lr_ranker must be >= 0"),
        ({"train.topk": [10, 0]}, "train.topk: every cut-off must be >= 1, got [10, 0]"),
        ({"train.topk": []}, "train.topk: needs at least one cut-off"),
        ({"seed": -1}, "seed must be in [0, 2**63), got -1"),
        ({"seed": 2**63}, "seed must be in [0, 2**63)"),
    ],
)
def test_validate_rejects_values_out_of_range_naming_key_and_range(sets, message):
    with pytest.raises(MMRankError) as info:
        validate(resolve(sets=sets))
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("sets", "topk_protocol", "message"),
    [
        ({"train.early_stop_metric": "recall@5"}, None, "'recall@5' needs 5 in train.topk, got [10, 20, 50]"),
        ({"train.early_stop_metric": "ndcg@20"}, False, "'ndcg@20' needs data with a top-K protocol"),
        ({"train.topk": [10]}, True, "'auto' (recall@20 on this data) needs 20 in train.topk, got [10]"),
    ],
)
def test_a_topk_stop_metric_needs_topk_data_and_its_cutoff(sets, topk_protocol, message):
    """Caught with the config, not as a null metric (or a max() of nothing) at the first validation."""
    with pytest.raises(MMRankError) as info:
        validate(resolve(sets=sets), topk_protocol)
    assert message in str(info.value)


def test_auto_stop_metric_is_checked_only_where_the_data_is_known():
    validate(resolve(sets={"train.topk": [10]}))  # auto may be auc: the data decides
    validate(resolve(sets={"train.topk": [10]}), topk_protocol=False)  # auto is auc
    validate(resolve(sets={"train.early_stop_metric": "recall@10", "train.topk": [10]}), topk_protocol=True)


def test_validate_rejects_nan_in_a_range():
    with pytest.raises(MMRankError, match="model.loss.cic_tau must be > 0, got nan"):
        validate(resolve(sets=parse_sets(["model.loss.cic_tau=NaN"])))


def test_every_preset_resolves_and_validates():
    names = list_presets()
    assert {"id_only", "pe", "task_pe", "em3", "lemur"} <= set(names)
    for name in names:
        validate(resolve(name))
