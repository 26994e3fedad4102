import pytest

from export.manifest import Manifest
from export.tensorrt import EngineConfig, build_engines, profile_shapes


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


def test_engines_build_from_the_export(small_export, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT not installed")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU for TensorRT")
    out = build_engines(small_export.out, tmp_path / "engines", EngineConfig(max_batch=8, max_candidates=64))
    for name in Manifest.read(small_export.out).graphs:
        assert (out / f"{name}.plan").stat().st_size > 0
