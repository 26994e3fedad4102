import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from common.errors import MMRankError
from export.manifest import MANIFEST, Manifest
from export.native_runtime import MAX_IR_VERSION, MAX_OPSET
from export.onnx_graphs import OPSET, export_run, find_dataset, table_ranker
from mmrank.cli import main
from model_repository.item_table import ItemTable


def test_manifest_describes_every_graph_with_dynamic_axes(small_export):
    m = Manifest.read(small_export.out)
    assert m.opset >= 17 and m.checkpoint["sha256"] == "0" * 64
    assert set(m.graphs) == {"text_encoder", "image_encoder", "fusion", "ranking"}
    ranking = m.graph("ranking")
    shapes = {t.name: t.shape for t in ranking.inputs}
    assert shapes["candidate_c"] == ["batch", "candidates", 16]
    assert shapes["history_c"] == ["batch", "history", 16] and shapes["history_mask"] == ["batch", "history"]
    assert shapes["candidate_item"] == ["batch", "candidates", m.model.item_dim]
    assert ranking.outputs[0].name == "scores" and ranking.outputs[0].shape == ["batch", "candidates"]
    assert m.graph("text_encoder").input("input_ids").shape == ["batch", 2, "tokens"]
    assert m.graph("image_encoder").output("image_feats").shape == ["batch", 1, 1280]
    assert [t.name for t in m.graph("fusion").inputs] == [
        "text_feats",
        "text_mask",
        "image_feats",
        "image_mask",
    ]
    assert m.model.history_len == 6 and m.model.user_feature_cards == [3]
    assert m.tokenizer.fields == ["title", "overview"] and not m.tokenizer.join_fields
    assert (small_export.out / "tokenizer" / "tokenizer.json").is_file()


def test_every_file_passes_the_onnx_checker_at_the_manifest_opset(small_export):
    m = Manifest.read(small_export.out)
    for g in m.graphs.values():
        for file in (g.file, g.fp16_file):
            model = onnx.load(str(small_export.out / file))
            onnx.checker.check_model(model, full_check=True)
            assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == OPSET
            assert model.ir_version <= MAX_IR_VERSION and OPSET <= MAX_OPSET  # Triton's native onnxruntime
    fp16 = onnx.load(str(small_export.out / m.graph("ranking").fp16_file))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in fp16.graph.initializer)
    assert fp16.graph.input[2].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 at the edges


def test_item_table_holds_bank_and_tower_vectors_and_item_rows(small_export):
    model = small_export.model
    table = ItemTable.read(small_export.out / "item_table")
    ids = torch.arange(model.schema.num_items + 1)
    with torch.inference_mode():
        np.testing.assert_allclose(table.content, model.item_vectors(ids).numpy(), atol=1e-6)
        np.testing.assert_allclose(table.item_rows, model.ranker.item_features(ids).numpy(), atol=0)
    assert np.all(table.content[0] == 0)
    assert table.source == {"checkpoint_sha256": "0" * 64}


def test_table_ranker_leaves_the_trained_model_untouched(small_export):
    model = small_export.model
    swapped = table_ranker(model)
    ids = torch.tensor([[1, 2]])
    rows = model.ranker.item_features(ids)
    assert torch.equal(swapped.ranker.item_features(rows), rows)
    assert model.ranker.item_features(ids).shape == (1, 2, model.ranker.item_dim)
    assert swapped.ranker.head is model.ranker.head and model._modules["ranker"] is not swapped.ranker


def _run_folder(tmp_path, checkpoint_bytes: bytes | None):
    from trainer.config import RunConfig
    from trainer.data.synth import SynthConfig, generate
    from trainer.run import data_identity, write_record

    data = tmp_path / "data"
    generate(data, SynthConfig(users=20, items=15, events=300, seed=0))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(RunConfig().to_json())
    write_record(run, data_identity(data))
    if checkpoint_bytes is not None:
        (run / "best.pt").write_bytes(checkpoint_bytes)
    return run, data


@pytest.mark.parametrize(
    "ckpt, message", [(None, "no best checkpoint"), (b"PK\x03\x04 truncated zip", "unreadable checkpoint")]
)
def test_bad_checkpoint_is_one_clear_error_and_writes_nothing(tmp_path, ckpt, message):
    run, data = _run_folder(tmp_path, ckpt)
    out = tmp_path / "export"
    with pytest.raises(MMRankError, match=message):
        export_run(run, out, data=str(data))
    assert not out.exists()
    assert not list(tmp_path.glob(".export*"))  # no temporary folder left behind


def test_existing_output_is_kept_without_force(tmp_path, small_export):
    run, data = _run_folder(tmp_path, b"x")
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MMRankError, match="pass --force"):
        export_run(run, out, data=str(data))
    assert (out / "keep.txt").read_text() == "mine"


def test_force_never_replaces_the_run_or_its_data(tmp_path):
    run, data = _run_folder(tmp_path, b"x")
    for out in (run, data, tmp_path):
        with pytest.raises(MMRankError, match="would replace the input"):
            export_run(run, out, data=str(data), force=True)
    assert (run / "best.pt").read_bytes() == b"x" and (data / "manifest.json").is_file()


def test_export_takes_the_training_dataset_before_an_evaluated_one(tmp_path):
    # The frozen feature buffers are filled from the dataset: the training one is the model's.
    run, data = _run_folder(tmp_path, b"x")
    (run / "evaluation.json").write_text(json.dumps({"data": "evaluated"}))
    assert find_dataset(run, None) == data.resolve()
    assert find_dataset(run, "given") == Path("given")


@pytest.mark.parametrize("record", [None, {"format_version": 0, "data": {}}])
def test_a_run_folder_of_another_format_is_refused_naming_it(tmp_path, record):
    run, data = _run_folder(tmp_path, b"x")
    (run / "run.json").unlink()
    if record is not None:
        (run / "run.json").write_text(json.dumps(record))
    message = (
        "no run.json" if record is None else "run.json: run folder format_version 0, this version reads 1"
    )
    for data_arg in (None, str(data)):
        with pytest.raises(MMRankError, match=message) as e:
            export_run(run, tmp_path / "export", data=data_arg)
        assert "train the run again" in str(e.value) and "\n" not in str(e.value)


def test_cli_prints_one_line(tmp_path, capsys):
    assert main(["export", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "mmrank export: error:" in err and "no best checkpoint" in err


def test_corrupt_manifest_is_reported(tmp_path, small_export):
    import shutil

    copy = tmp_path / "export"
    shutil.copytree(small_export.out, copy)
    (copy / MANIFEST).write_text("{not json")
    with pytest.raises(MMRankError, match="not valid JSON"):
        Manifest.read(copy)
    raw = json.loads((small_export.out / MANIFEST).read_text())
    del raw["graphs"]["ranking"]["inputs"]
    (copy / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(MMRankError, match="do not match the format"):
        Manifest.read(copy)
    raw = json.loads((small_export.out / MANIFEST).read_text())
    (copy / MANIFEST).write_text(json.dumps({**raw, "format_version": 1}))
    with pytest.raises(MMRankError) as e:
        Manifest.read(copy)
    assert str(e.value) == (
        f"{copy / MANIFEST}: export format_version 1, this version reads 3; export the run again"
    )
    (copy / MANIFEST).write_text((small_export.out / MANIFEST).read_text())
    (copy / "ranking.onnx").unlink()
    with pytest.raises(MMRankError, match="ranking.onnx: listed in the manifest but missing"):
        Manifest.read(copy)
