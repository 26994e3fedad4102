import json
from dataclasses import asdict, replace

import pytest

from common.errors import MMRankError
from export.manifest import Manifest
from export.tensorrt import (
    PLAN_TAG,
    EngineConfig,
    build_engines,
    check_engine_file,
    check_engines_hold,
    profile_shapes,
)
from mmrank.cli import main
from model_repository.limits import RequestLimits


def test_profiles_cover_every_dynamic_axis(small_export):
    manifest = Manifest.read(small_export.out)
    cfg = EngineConfig(max_batch=16, max_candidates=500)
    ranking = profile_shapes(manifest.graph("ranking"), manifest, cfg)
    low, opt, high = ranking["candidate_c"]
    assert low == (1, 1, 16) and opt == (8, 100, 16) and high == (16, 500, 16)
    assert ranking["history_mask"] == ((1, 6), (8, 6), (16, 6))  # the lookup pads histories to 6
    assert ranking["user_id"] == ((1,), (8,), (16,))
    tokens = profile_shapes(manifest.graph("text_encoder"), manifest, cfg)["input_ids"]
    assert tokens == ((1, 2, 1), (8, 2, 24), (16, 2, 24))  # up to the tokenizer's limit
    for name in manifest.graphs:
        for low, opt, high in profile_shapes(manifest.graph(name), manifest, cfg).values():
            assert all(a <= b <= c for a, b, c in zip(low, opt, high, strict=True))


def test_a_small_maximum_caps_the_optimum(small_export):
    manifest = Manifest.read(small_export.out)
    cfg = EngineConfig(max_batch=4, max_candidates=64)
    for name in manifest.graphs:
        for low, opt, high in profile_shapes(manifest.graph(name), manifest, cfg).values():
            assert all(a <= b <= c for a, b, c in zip(low, opt, high, strict=True))
    assert profile_shapes(manifest.graph("ranking"), manifest, cfg)["candidate_c"][1][:2] == (4, 64)


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_engines_build_from_the_export(small_export, tmp_path):
    out = build_engines(small_export.out, tmp_path / "engines", EngineConfig(max_batch=8, max_candidates=64))
    for name in Manifest.read(small_export.out).graphs:
        check_engine_file(out / f"{name}.plan")  # real engines carry the header the render checks


def test_default_profiles_hold_the_default_request_limits():
    from export.repository import RenderConfig

    rc, cfg = RenderConfig(), EngineConfig()
    assert cfg.max_candidates == RequestLimits().max_candidates == rc.limits.max_candidates
    assert cfg.max_batch == rc.max_batch_size


# What a serialized engine's header looks like (tag, serialization version, TensorRT 10.0.1.6 at bytes 24-27)
# and then some bytes: rendering reads only the header, so TensorRT is not needed to test it.
FAKE_ENGINE = PLAN_TAG + bytes(4) + bytes(16) + bytes([10, 0, 1, 6]) + b"engine body"


def _fake_engines(small_export, folder, cfg: EngineConfig):
    """Files with an engine's header (not real engines) and the engines.json record."""
    folder.mkdir()
    graphs = Manifest.read(small_export.out).graphs
    for name in graphs:
        (folder / f"{name}.plan").write_bytes(FAKE_ENGINE)
    sources = {name: {"onnx_sha256": g.sha256} for name, g in graphs.items()}
    (folder / "engines.json").write_text(
        json.dumps({"tensorrt": "test", "config": asdict(cfg), "engines": sources})
    )
    return folder


def test_tensorrt_repository_refuses_limits_beyond_the_engine_profiles(small_export, tmp_path):
    from export.repository import RenderConfig, render_repository

    engines = _fake_engines(
        small_export, tmp_path / "engines", EngineConfig(max_batch=16, max_candidates=500)
    )
    manifest = Manifest.read(small_export.out)
    check_engines_hold(engines, manifest, 16, 500)
    too_many = RenderConfig(backend="tensorrt", engines_dir=engines, max_batch_size=16)
    with pytest.raises(
        MMRankError,
        match=r"admits 2000 candidates per user .max_candidates., the TensorRT engines in .* hold at most 500",
    ):
        render_repository(small_export.out, tmp_path / "repo", too_many)
    too_wide = RenderConfig(backend="tensorrt", engines_dir=engines, limits=RequestLimits(max_candidates=500))
    with pytest.raises(
        MMRankError,
        match=r"admits 64 rows per batch \(max_batch_size\), .* hold at most 16: rebuild them with",
    ):
        render_repository(small_export.out, tmp_path / "repo", too_wide)
    assert not (tmp_path / "repo").exists()
    record = json.loads((engines / "engines.json").read_text())
    record["engines"]["ranking"]["onnx_sha256"] = "0" * 64
    (engines / "engines.json").write_text(json.dumps(record))
    with pytest.raises(MMRankError, match="no engine built from this export's ranking graph"):
        check_engines_hold(engines, manifest, 16, 500)
    (engines / "engines.json").unlink()
    with pytest.raises(MMRankError, match="engines.json: unreadable engine record"):
        check_engines_hold(engines, manifest, 16, 500)
    fits = RenderConfig(
        backend="tensorrt",
        engines_dir=_fake_engines(small_export, tmp_path / "e2", EngineConfig()),
        max_batch_size=64,
    )
    render_repository(small_export.out, tmp_path / "repo", fits)
    assert (tmp_path / "repo" / "ranking" / "1" / "model.plan").is_file()
    with pytest.raises(MMRankError, match="leave --precision at fp32"):
        render_repository(small_export.out, tmp_path / "r2", replace(fits, precision="fp16"))
    with pytest.raises(MMRankError, match="--engines applies to the tensorrt backend only"):
        render_repository(small_export.out, tmp_path / "r2", replace(fits, backend="onnxruntime"))
    with pytest.raises(MMRankError, match="would replace the input"):  # the engines are an input too
        render_repository(small_export.out, fits.engines_dir, fits, force=True)
    args = ["repo", "--export", str(small_export.out), "--out", str(tmp_path / "r3"), "--backend", "tensorrt"]
    assert main([*args, "--engines", str(fits.engines_dir)]) == 0
    assert (tmp_path / "r3" / "ranking" / "1" / "model.plan").is_file()


@pytest.mark.parametrize(
    "content, found",
    [
        (b"plan", "4 bytes"),
        (b"", "0 bytes"),
        (b"\x08\x07\x12\x07pytorch" + bytes(40), r"it starts with b'\\x08\\x07\\x12\\x07'"),  # an ONNX file
        (FAKE_ENGINE[:27], "27 bytes"),
    ],
)
def test_a_plan_that_is_no_tensorrt_engine_is_refused_by_the_render(small_export, tmp_path, content, found):
    from export.repository import RenderConfig, render_repository

    engines = _fake_engines(small_export, tmp_path / "engines", EngineConfig())
    (engines / "ranking.plan").write_bytes(content)
    rc = RenderConfig(backend="tensorrt", engines_dir=engines)
    with pytest.raises(MMRankError, match=f"ranking.plan: not a TensorRT engine .* {found}") as e:
        render_repository(small_export.out, tmp_path / "repo", rc)
    assert "\n" not in str(e.value) and not (tmp_path / "repo").exists()
    (engines / "ranking.plan").write_bytes(FAKE_ENGINE)
    assert check_engine_file(engines / "ranking.plan") == engines / "ranking.plan"
    render_repository(small_export.out, tmp_path / "repo", rc)
