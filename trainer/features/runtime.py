"""Runs a frozen encoder under PyTorch (the reference) or onnxruntime (CPU execution provider).

The onnxruntime path exports the encoder once with `torch.onnx.export` (TorchScript exporter,
`dynamo=False`: it traces the transformers 5 BERT and the static-padding EfficientNet cleanly) into
an ONNX cache folder, keyed by the weights hash, the encoder's source and the versions of the packages
that trace it, and reuses the file later; a cached file onnxruntime cannot load is exported again.

`--runtime auto` uses onnxruntime for both encoders, from `benchmarks/encoder_runtime.py` on this
project's 2-core CPU (AMD EPYC, torch 2 threads, onnxruntime default threads; batch of 64; runtimes
timed alternately, 7 calls each, median ms; the CPU was shared, load average 2.1-2.8; full table in
benchmarks/results/encoder_runtime.md):

    text  x 16 tokens:   torch  276.7   onnxruntime  160.8   (1.7x)
    text  x 64 tokens:   torch 2316.9   onnxruntime 1659.6   (1.4x)
    text  x 128 tokens:  torch 2878.7   onnxruntime 3370.4   (within the noise: minima 1734.8 vs 1722.4)
    image 224 x 224:     torch 2666.2   onnxruntime  408.6   (6.5x)

End to end on ML-100K (benchmarks/results/feature_cache.md) the same holds: text 49.6 s under torch vs
47.2 s under onnxruntime, images 111.5 s vs 15.4 s.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.errors import DataError

RUNTIMES = ("torch", "onnxruntime")
AUTO_RUNTIME = {"text": "onnxruntime", "image": "onnxruntime"}
OPSET = 17
# The exporter and the encoders' model code: a new version of any of them may trace another graph.
EXPORT_PACKAGES = ("torch", "onnx", "transformers", "efficientnet-lite-pytorch")

Runner = Callable[..., np.ndarray]  # numpy inputs in the encoder's input order -> numpy features


def sha256_files(paths: list[Path]) -> str:
    """One digest over the files' names and bytes, in order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).name.encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def default_onnx_dir() -> Path:
    """Exported encoder graphs live outside datasets so every dataset shares them."""
    return Path(os.environ.get("MMRANK_CACHE", Path.home() / ".cache" / "mmrank")) / "onnx"


def resolve_runtime(runtime: str, modality: str) -> str:
    if runtime == "auto":
        return AUTO_RUNTIME[modality]
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; expected auto or one of {RUNTIMES}")
    return runtime


class TorchRunner:
    """The reference: the nn.Module itself, switched to eval mode, run without autograd."""

    def __init__(self, module: nn.Module):
        self.module = module.eval()

    def __call__(self, *inputs: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.module(*(torch.from_numpy(np.asarray(x)) for x in inputs)).numpy()


class OrtRunner:
    """An onnxruntime CPU session over an exported encoder graph."""

    def __init__(self, onnx_path: str | Path, threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0 = onnxruntime's default, one per physical core
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        # onnxruntime's load errors (InvalidProtobuf, Fail, NoSuchFile, ...) derive from Exception only.
        except Exception as e:
            raise DataError(onnx_path, f"onnxruntime cannot load the graph ({type(e).__name__}: {e})") from e
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *inputs: np.ndarray) -> np.ndarray:
        return self.session.run(None, dict(zip(self.input_names, inputs, strict=True)))[0]


def export_onnx(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    input_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    path: str | Path,
) -> Path:
    """Export `module` in eval mode (output named "features") to `path`, written to a temporary file
    then renamed; the module's train/eval mode is restored afterwards."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".onnx", dir=path.parent)
    os.close(fd)
    training = module.training
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript exporter deprecation + tracer notes on constants
            torch.onnx.export(
                module.eval(),
                example,
                tmp,
                input_names=input_names,
                output_names=["features"],
                dynamic_axes=dynamic_axes,
                opset_version=OPSET,
                dynamo=False,
            )
        os.replace(tmp, path)
    finally:
        module.train(training)
        Path(tmp).unlink(missing_ok=True)
    return path


def onnx_runner(
    module: nn.Module,
    name: str,
    weights_sha256: str,
    onnx_dir: str | Path | None = None,
    threads: int = 0,
) -> OrtRunner:
    """An onnxruntime runner for an encoder that declares `onnx_inputs`, `onnx_axes` and
    `example_inputs()`. The graph is exported on first use and cached (`onnx_path`); a cached file that
    onnxruntime cannot load (truncated by a crash or a full disk) is exported again, once."""
    path = onnx_path(module, name, weights_sha256, onnx_dir)
    if path.is_file():
        try:
            return OrtRunner(path, threads)
        except DataError:
            pass
    export_onnx(module, module.example_inputs(), list(module.onnx_inputs), module.onnx_axes, path)
    return OrtRunner(path, threads)


def onnx_path(module: nn.Module, name: str, weights_sha256: str, onnx_dir: str | Path | None = None) -> Path:
    """The cached graph of `module`, keyed by the weights hash, the source of the encoder's module file
    and the versions of EXPORT_PACKAGES, so a change of any of them exports afresh."""
    source = inspect.getsource(inspect.getmodule(type(module))).encode()
    versions = ",".join(f"{p}=={importlib.metadata.version(p)}" for p in EXPORT_PACKAGES).encode()
    key = hashlib.sha256(weights_sha256.encode() + source + versions).hexdigest()[:16]
    return Path(onnx_dir or default_onnx_dir()) / f"{name}-{key}-opset{OPSET}.onnx"


def make_runner(
    runtime: str,
    module: nn.Module,
    name: str,
    weights_sha256: str,
    onnx_dir: str | Path | None = None,
    threads: int = 0,
) -> Runner:
    if runtime == "torch":
        return TorchRunner(module)
    return onnx_runner(module, name, weights_sha256, onnx_dir, threads)
