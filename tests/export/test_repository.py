import json
import shutil
from dataclasses import asdict

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from common.errors import MMRankError
from export.manifest import Manifest
from export.repository import RenderConfig, build_configs, check_ensembles, render_repository, table_model
from mmrank.cli import main
from model_repository.limits import EncodeLimits, RequestLimits

ALL_MODELS = {
    "rank",
    "item_lookup",
    "ranking",
    "encode_items",
    "tokenizer",
    "text_encoder",
    "image_preprocess",
    "image_encoder",
    "fusion",
}


def _parse(repo) -> dict[str, mc.ModelConfig]:
    configs = {}
    for path in sorted(repo.glob("*/config.pbtxt")):
        config = text_format.Parse(path.read_text(), mc.ModelConfig())  # Triton's own schema
        assert config.name == path.parent.name
        configs[config.name] = config
    return configs


@pytest.fixture(scope="module")
def python_repo(small_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("repo") / "python"
    render_repository(small_export.out, out, RenderConfig(backend="python"))
    return out


def test_python_repository_parses_and_its_ensembles_agree(python_repo):
    configs = _parse(python_repo)
    assert set(configs) == ALL_MODELS
    check_ensembles(configs)
    for name in (
        "ranking",
        "fusion",
        "text_encoder",
        "image_encoder",
        "item_lookup",
        "tokenizer",
        "image_preprocess",
    ):
        assert configs[name].backend == "python"
        assert (python_repo / name / "1" / "model.py").is_file()
        for folder in (python_repo / name / "1", python_repo / name / "1" / "model_repository"):
            assert (folder / "__pycache__").is_file()  # a bytecode folder can never be created there
    assert (python_repo / "ranking" / "1" / "model.onnx").is_file()
    assert (python_repo / "item_lookup" / "1" / "item_table" / "table.json").is_file()
    assert (python_repo / "tokenizer" / "1" / "tokenizer" / "tokenizer.json").is_file()
    assert configs["item_lookup"].version_policy.latest.num_versions == 1
    assert configs["ranking"].dynamic_batching.max_queue_delay_microseconds > 0
    assert configs["item_lookup"].instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU


def test_rank_ensemble_contract(python_repo):
    rank = _parse(python_repo)["rank"]
    inputs = {t.name: t for t in rank.input}
    assert list(inputs["history_ids"].dims) == [-1] and inputs["history_ids"].data_type == mc.TYPE_INT64
    assert list(inputs["candidate_ids"].dims) == [-1]
    assert inputs["user_id"].optional and inputs["user_feats"].optional
    outputs = {t.name: (mc.DataType.Name(t.data_type), list(t.dims)) for t in rank.output}
    assert outputs == {
        "scores": ("TYPE_FP32", [-1]),
        "candidate_known": ("TYPE_BOOL", [-1]),
        "user_known": ("TYPE_BOOL", [1]),
        "item_table_version": ("TYPE_INT64", [1]),
    }
    # python backend: the lookup runs the ranking graph itself, one step (serving_overhead.md)
    assert [s.model_name for s in rank.ensemble_scheduling.step] == ["item_lookup"]
    assert (python_repo / "item_lookup" / "1" / "ranking.onnx").is_file()


def test_tensor_specs_come_from_the_manifest(small_export, python_repo):
    manifest = Manifest.read(small_export.out)
    configs = _parse(python_repo)
    for graph in ("ranking", "fusion", "text_encoder", "image_encoder"):
        spec = manifest.graph(graph)
        got = {t.name: (mc.DataType.Name(t.data_type), list(t.dims)) for t in configs[graph].input}
        for t in spec.inputs:
            dims = [d if isinstance(d, int) else -1 for d in t.shape[1:]] or [1]
            assert got[t.name] == (t.triton_dtype, dims)
    user_id = {t.name: t for t in configs["ranking"].input}["user_id"]
    assert user_id.HasField("reshape") and list(user_id.reshape.shape) == []  # [batch, 1] -> [batch]


@pytest.mark.parametrize(
    "backend, lookup, platform, steps",
    [
        ("onnxruntime", "merged", "onnxruntime_onnx", []),  # `rank` is the native model itself
        ("onnxruntime", "separate", "onnxruntime_onnx", ["item_lookup", "ranking"]),
        ("tensorrt", "merged", "tensorrt_plan", ["item_lookup", "ranking"]),  # an engine holds no lookup
    ],
)
def test_native_backend_configs(small_export, python_repo, backend, lookup, platform, steps):
    manifest = Manifest.read(small_export.out)
    configs = build_configs(manifest, RenderConfig(backend=backend, lookup=lookup))
    for name, config in configs.items():
        parsed = text_format.Parse(text_format.MessageToString(config), mc.ModelConfig())
        assert parsed == config
        if name in ("ranking", "fusion", "text_encoder", "image_encoder"):
            assert config.platform == platform and not config.backend
        elif name in ("tokenizer", "image_preprocess"):
            assert config.backend == "python"  # pure-Python steps stay Python
    lookup_model = configs["item_lookup" if steps else "rank"]
    # the native lookup graph without batching (optional inputs need that): whole tensors from the
    # batching `rank` ensemble, or `rank` itself with the batch axis in its dims
    assert lookup_model.platform == "onnxruntime_onnx" and lookup_model.max_batch_size == 0
    assert {t.name for t in lookup_model.input if t.optional} == {"user_id", "user_feats"}
    assert ("item_lookup" in configs) == bool(steps)
    if backend == "tensorrt":
        assert configs["ranking"].instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert [s.model_name for s in configs["rank"].ensemble_scheduling.step] == steps
    python = _parse(python_repo)["rank"]
    for a, b in ((configs["rank"].input, python.input), (configs["rank"].output, python.output)):
        # the same contract as the python backend's rank: a request of B rows is [B, ...] on both
        def contract(tensors):
            return [(t.name, t.data_type, getattr(t, "optional", False)) for t in tensors]

        assert contract(a) == contract(b)
        want = [list(t.dims) if steps else [-1, *t.dims] for t in b]
        assert [list(t.dims) for t in a] == want
    check_ensembles(configs)


def test_onnxruntime_render_and_fp16_variant(small_export, tmp_path):
    from export.repository import native_lookup

    render_repository(
        small_export.out, tmp_path / "ort", RenderConfig(backend="onnxruntime", precision="fp16")
    )
    assert not (tmp_path / "ort" / "ranking" / "1" / "model.py").exists()
    model = (tmp_path / "ort" / "ranking" / "1" / "model.onnx").read_bytes()
    assert model == (small_export.out / "ranking.fp16.onnx").read_bytes()
    configs = _parse(tmp_path / "ort")
    check_ensembles(configs)
    assert "item_lookup" not in configs and table_model(tmp_path / "ort") == tmp_path / "ort" / "rank"
    version = tmp_path / "ort" / "rank" / "1"
    assert (version / "ranking.onnx").read_bytes() == model  # what the next table version is built with
    assert not (version / "model.py").exists()
    native_lookup(configs["rank"]).check(version, 1, (16, 12))  # loads, answers a probe


def test_instance_kind_applies_to_every_native_model(small_export):
    configs = build_configs(
        Manifest.read(small_export.out), RenderConfig(backend="onnxruntime", instance_kind="cpu")
    )
    for name in ("ranking", "fusion", "text_encoder", "image_encoder", "rank"):
        assert configs[name].instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU, name
    auto = build_configs(Manifest.read(small_export.out), RenderConfig(backend="onnxruntime"))
    assert auto["rank"].instance_group[0].kind == mc.ModelInstanceGroup.KIND_AUTO
    with pytest.raises(MMRankError, match="instance_kind 'tpu'"):
        RenderConfig(instance_kind="tpu")


def test_rank_threads_set_the_ranking_steps_onnxruntime_threads(small_export, tmp_path, capsys):
    out = tmp_path / "ort"
    args = ["repo", "--export", str(small_export.out), "--out", str(out), "--backend", "onnxruntime"]
    assert main([*args, "--rank-threads", "2"]) == 0
    native = _parse(out)["rank"]
    assert native.parameters["intra_op_thread_count"].string_value == "2"
    python = build_configs(Manifest.read(small_export.out), RenderConfig(rank_graph_threads=3))
    assert python["item_lookup"].parameters["graph_threads"].string_value == "3"
    assert main([*args, "--rank-threads", "0", "--force"]) != 0
    assert "rank_graph_threads must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["python", "onnxruntime"])
def test_instance_counts_reach_the_configs(small_export, tmp_path, backend, capsys):
    out = tmp_path / backend
    args = ["repo", "--export", str(small_export.out), "--out", str(out), "--backend", backend]
    assert main([*args, "--lookup-instances", "2", "--graph-instances", "3"]) == 0
    configs = _parse(out)
    assert configs[RenderConfig(backend=backend).table_model].instance_group[0].count == 2
    for name in ("fusion", "text_encoder", "image_encoder"):
        assert configs[name].instance_group[0].count == 3, name
    assert main([*args, "--lookup-instances", "0", "--force"]) != 0
    assert "lookup_instances must be >= 1, got 0" in capsys.readouterr().err


def _mutated(small_export):
    return build_configs(
        Manifest.read(small_export.out), RenderConfig(backend="onnxruntime", lookup="separate")
    )


def test_ensemble_check_catches_broken_maps(small_export):
    configs = _mutated(small_export)
    next(t for t in configs["ranking"].input if t.name == "candidate_c").data_type = mc.TYPE_FP16
    with pytest.raises(MMRankError, match="'candidate_c' is TYPE_FP32, expected TYPE_FP16"):
        check_ensembles(configs)
    configs = _mutated(small_export)
    step = next(
        s for s in configs["encode_items"].ensemble_scheduling.step if s.model_name == "image_encoder"
    )
    step.input_map["pixels"] = "nothing"
    with pytest.raises(MMRankError, match="reads 'nothing', which no earlier step produces"):
        check_ensembles(configs)
    configs = _mutated(small_export)
    del configs["rank"].ensemble_scheduling.step[1].input_map["history_mask"]
    with pytest.raises(MMRankError, match="required input 'history_mask' is not mapped"):
        check_ensembles(configs)
    configs = _mutated(small_export)
    next(t for t in configs["fusion"].input if t.name == "text_feats").dims[-1] = 383
    with pytest.raises(MMRankError, match="dims"):
        check_ensembles(configs)
    configs = _mutated(small_export)  # a model without batching states the batch axis itself
    history = next(t for t in configs["item_lookup"].output if t.name == "history_c")
    del history.dims[0]
    with pytest.raises(MMRankError, match=r"'history_c' has dims \[-1, 16\], expected \[-1, -1, 16\]"):
        check_ensembles(configs)


def test_bad_inputs_leave_nothing_behind(small_export, tmp_path):
    with pytest.raises(MMRankError, match="export folder not found"):
        render_repository(tmp_path / "missing", tmp_path / "a")
    with pytest.raises(MMRankError, match="unknown backend 'triton'"):
        render_repository(small_export.out, tmp_path / "a", RenderConfig(backend="triton"))
    with pytest.raises(MMRankError, match="no TensorRT engine"):
        render_repository(small_export.out, tmp_path / "a", RenderConfig(backend="tensorrt"))
    broken = tmp_path / "broken"
    shutil.copytree(small_export.out, broken)
    (broken / "manifest.json").write_text("[1, 2")
    with pytest.raises(MMRankError, match="not valid JSON"):
        render_repository(broken, tmp_path / "a")
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".a.*"))
    out = tmp_path / "kept"
    out.mkdir()
    (out / "mine").write_text("x")
    with pytest.raises(MMRankError, match="pass --force"):
        render_repository(small_export.out, out)
    assert (out / "mine").read_text() == "x"
    render_repository(small_export.out, out, force=True)
    assert not (out / "mine").exists() and (out / "rank" / "config.pbtxt").is_file()


def test_cli_errors_are_one_line(small_export, tmp_path, capsys):
    assert main(["repo", "--export", str(tmp_path / "none"), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("mmrank repo: error:")
    assert (
        main(
            [
                "repo",
                "--export",
                str(small_export.out),
                "--out",
                str(tmp_path / "r"),
                "--backend",
                "onnxruntime",
            ]
        )
        == 0
    )
    assert "rank" in capsys.readouterr().out


def test_encode_items_preprocessing_carries_its_request_limits(small_export):
    limits = EncodeLimits(max_items=8, max_text_bytes=1000, max_image_bytes=5000)
    configs = build_configs(Manifest.read(small_export.out), RenderConfig(encode_limits=limits))
    for name in ("tokenizer", "image_preprocess"):
        rendered = json.loads(configs[name].parameters["limits"].string_value)
        assert rendered == asdict(limits) and EncodeLimits(**rendered) == limits


def test_repo_command_defaults_are_the_limits_defaults(tmp_path, capsys):
    from mmrank.cli import build_parser

    args = build_parser().parse_args(["repo", "--export", "e", "--out", "o"])
    assert RequestLimits(args.max_candidates, args.max_history, args.max_request_bytes) == RequestLimits()
    assert EncodeLimits(args.max_encode_items, args.max_text_bytes, args.max_image_bytes) == EncodeLimits()
    assert (
        main(["repo", "--export", str(tmp_path), "--out", str(tmp_path / "r"), "--max-text-bytes", "0"]) == 1
    )
    err = capsys.readouterr().err.strip()
    assert err.endswith("encode limit max_text_bytes must be >= 1, got 0") and len(err.splitlines()) == 1


def test_force_never_replaces_its_own_input(small_export, tmp_path):
    export = tmp_path / "runs" / "export"
    shutil.copytree(small_export.out, export)
    for out in (export, export.parent):
        with pytest.raises(MMRankError, match="would replace the input"):
            render_repository(export, out, force=True)
    assert Manifest.read(export).graphs  # the export is whole
    assert main(["repo", "--export", str(export), "--out", str(export), "--force"]) == 1


def test_rendered_repository_is_readable_by_other_users(python_repo):
    # mkdtemp's 0700 must not survive into the repository a server running as another uid reads.
    assert python_repo.stat().st_mode & 0o055 == 0o055


def test_a_graph_changed_since_export_is_refused(small_export, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(small_export.out, export)
    ranking = export / Manifest.read(export).graph("ranking").file
    ranking.write_bytes(ranking.read_bytes()[:1000])
    with pytest.raises(
        MMRankError, match=r"ranking\.onnx: its sha256 differs from the one manifest.json records"
    ):
        render_repository(export, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize(
    "field", ["max_batch_size", "graph_instances", "lookup_instances", "rank_graph_threads"]
)
def test_render_config_refuses_counts_below_one(field):
    with pytest.raises(MMRankError, match=f"{field} must be >= 1, got 0"):
        RenderConfig(**{field: 0})


def test_an_unwritable_output_is_a_one_line_error(small_export, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["repo", "--export", str(small_export.out), "--out", str(tmp_path / "afile" / "repo")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmrank repo: error:") and "cannot create the output's folder" in err
    assert len(err.splitlines()) == 1 and (tmp_path / "afile").read_text() == "x"
