"""A small multimodal RankingModel built from a random schema, and its export, shared by the export tests.

The model has every serving-relevant part: text (2 fields) + image tokens fused by FQ-Former, a memory
bank holding some items (the rest come from the tower), target attention, the cross-attention decoder,
similarity features, item categoricals and a user feature. Its text encoder is a one-layer BERT with
random weights and the real MiniLM tokenizer (the trainer's TextEncoder class on a small model folder),
its image encoder the real EfficientNet-Lite0. Exporting it (every graph, fp32 + fp16) takes ~20 s
once per session.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

NUM_ITEMS, NUM_USERS = 30, 6
TEXT_FIELDS = ["title", "overview"]
MAX_TOKENS = 24


@dataclass
class SmallExport:
    model: torch.nn.Module
    out: Path
    text: object  # export.onnx_graphs.TextSetup
    config: object  # export.onnx_graphs.ExportConfig
    text_dir: Path


def make_tiny_text_model(folder: Path) -> Path:
    """A one-layer, 384-wide BERT with random weights and the real MiniLM tokenizer files."""
    from transformers import BertConfig, BertModel

    from model_repository.text_inputs import TOKENIZER_FILES
    from trainer.features.text import text_model_path

    torch.manual_seed(0)
    config = BertConfig(hidden_size=384, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    BertModel(config).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy2(text_model_path() / name, folder / name)
    return folder


def make_schema(num_items: int = NUM_ITEMS, seed: int = 0, precomputed: bool = False):
    """Text + image features as the frozen cache has them, or (`precomputed`) MMRec-style feature
    tokens "v_feat" and "t_feat" (one per item), which have no encoder graph."""
    from trainer.model.ranking_model import ModelSchema

    gen = torch.Generator().manual_seed(seed)
    if precomputed:
        tokens = {}
        for name, dim in (("v_feat", 8), ("t_feat", 5)):
            feats = torch.randn(num_items + 1, 1, dim, generator=gen)
            feats[0] = 0
            tokens[name] = (feats, feats.abs().sum(-1) > 0)
        cats = torch.randint(1, 4, (num_items + 1, 2), generator=gen)
        return ModelSchema(num_items, NUM_USERS, cats, (4, 4), (3,), tokens)
    text = torch.randn(num_items + 1, 2, 384, generator=gen)
    text_mask = torch.ones(num_items + 1, 2, dtype=torch.bool)
    text_mask[::4, 1] = False
    image = torch.rand(num_items + 1, 1, 1280, generator=gen) * 3
    image_mask = torch.ones(num_items + 1, 1, dtype=torch.bool)
    image_mask[5] = False
    text[0], image[0], text_mask[0], image_mask[0] = 0, 0, False, False
    cats = torch.randint(1, 4, (num_items + 1, 2), generator=gen)
    cats[0] = 0
    return ModelSchema(
        num_items, NUM_USERS, cats, (4, 4), (3,), {"text": (text, text_mask), "image": (image, image_mask)}
    )


def make_model(schema=None, **overrides):
    """A RankingModel in eval mode; `overrides` are "section.field" -> value on the ModelConfig."""
    from trainer.model.config import ContentConfig, InterestConfig, ModelConfig, RankerConfig
    from trainer.model.ranking_model import RankingModel

    torch.manual_seed(0)
    cfg = ModelConfig(
        content=ContentConfig(d=16, fusion_heads=4, dropout=0.0),
        interest=InterestConfig(
            short_len=6,
            attention_heads=2,
            memory_bank=True,
            decoder_layers=1,
            decoder_heads=2,
            similarity_topk=2,
        ),
        ranker=RankerConfig(id_dim=4, hidden=(16,), dropout=0.0, token_dim=8),
    )
    for path, value in overrides.items():
        part, name = path.split(".")
        setattr(getattr(cfg, part), name, value)
    model = RankingModel(cfg, schema or make_schema())
    if model.bank is not None:  # half the items served from the bank, half from the tower
        ids = torch.arange(1, model.schema.num_items // 2 + 1)
        model.bank.write(ids, torch.randn(len(ids), cfg.content.d), step=1)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory) -> Path:
    return make_tiny_text_model(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def small_export(tmp_path_factory, tiny_text_dir) -> SmallExport:
    from export.onnx_graphs import ExportConfig, TextSetup, export_model
    from trainer.features.text import TextEncoder

    torch.set_num_threads(2)
    model = make_model()
    text = TextSetup(TEXT_FIELDS, MAX_TOKENS, False, tiny_text_dir)
    config = ExportConfig(text_encoder=TextEncoder(tiny_text_dir))
    out = tmp_path_factory.mktemp("small") / "export"
    export_model(model, out, {"path": "random-init", "sha256": "0" * 64}, text, config)
    return SmallExport(model, out, text, config, tiny_text_dir)


@pytest.fixture(scope="session")
def triton_server(tritonserver, small_export, tmp_path_factory):
    """The real tritonserver on a python-backend repository rendered from `small_export`, shared by the
    server and client tests (starting it takes seconds). Skipped only where nvidia-pytriton is not
    installed (the `tritonserver` fixture)."""
    from export.repository import RenderConfig, render_repository
    from export.triton_launcher import TritonConfig, TritonServer

    repo = tmp_path_factory.mktemp("triton") / "repo"
    render_repository(small_export.out, repo, RenderConfig(backend="python", max_batch_size=8))
    with TritonServer(TritonConfig(repo, control_mode="explicit")) as srv:
        srv.repo = repo
        srv.log_at_ready = srv.log_path.read_text(errors="replace")  # before any test sends a bad request
        yield srv


@pytest.fixture(scope="session")
def native_backend(tritonserver):
    """Triton's native onnxruntime backend as `make setup` builds it (export/native_backend.py). Tests
    that need it fail, never skip, where it is not built: set-up always builds it."""
    from common.errors import MMRankError
    from export.native_backend import NativeBackend

    try:
        return NativeBackend.find()
    except MMRankError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def native_server(native_backend, small_export, tmp_path_factory):
    """The real tritonserver on the `onnxruntime` render of `small_export`: the graphs and `rank` (the
    lookup graph merged into the ranking graph) on the native backend, tokenizer and image_preprocess
    in the Python backend."""
    from export.repository import RenderConfig, render_repository
    from export.triton_launcher import TritonConfig, TritonServer

    repo = tmp_path_factory.mktemp("triton_native") / "repo"
    render_repository(small_export.out, repo, RenderConfig(backend="onnxruntime", max_batch_size=8))
    with TritonServer(TritonConfig(repo, control_mode="explicit")) as srv:
        srv.repo = repo
        yield srv


BARE_PACKAGES = ("numpy<2", "onnxruntime", "tokenizers", "Pillow")  # what the rendered README lists


def _python(version: str) -> tuple[str, str] | None:
    """(interpreter, X.Y) of Python `version` on PATH or under pyenv, or None."""
    import os
    import subprocess

    probe = "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"
    pyenv = Path(os.environ.get("PYENV_ROOT", "~/.pyenv")).expanduser()
    candidates = [
        shutil.which(f"python{version}"),
        *sorted(pyenv.glob(f"versions/{version}*/bin/python{version}")),
    ]
    for python in filter(None, candidates):  # a pyenv shim may not run: try each
        done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=False)
        if done.returncode == 0 and done.stdout.strip() == version:
            return str(python), version
    return None


# The oldest Python the runtime supports (this interpreter's where the machine lacks it) and 3.12, whose
# backend stub ignores PYTHONDONTWRITEBYTECODE (the repository must stop bytecode writes by itself).
BARE_PYTHONS = ("3.10", "3.12")


@pytest.fixture(scope="session", params=BARE_PYTHONS)
def bare_python_env(request) -> Path:
    """A venv holding only BARE_PACKAGES for each of BARE_PYTHONS, created once under this venv and
    reused (pip, from PyPI)."""
    import subprocess
    import sys

    found = _python(request.param)
    if found is None and request.param == BARE_PYTHONS[0]:
        found = sys.executable, f"{sys.version_info[0]}.{sys.version_info[1]}"
    if found is None:
        pytest.skip(f"no Python {request.param} on this machine")
    python, version = found
    env = Path(sys.prefix) / f"bare-serving-env-{version}"
    ready = env / ".ready"
    if not ready.is_file():
        shutil.rmtree(env, ignore_errors=True)
        subprocess.run([python, "-m", "venv", str(env)], check=True)
        pip = [str(env / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, *BARE_PACKAGES], check=True)
        ready.write_text(" ".join(BARE_PACKAGES) + "\n")
    return env
