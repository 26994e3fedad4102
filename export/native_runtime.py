"""What the native backend's ONNX Runtime reads: ONNX files up to IR version 10 and opset 21.

Triton's onnxruntime backend (export/native_backend.py builds it) runs ONNX Runtime 1.19, whatever
onnxruntime the venv itself runs; a file the venv's onnxruntime loads may still be refused by the
server. Every graph this project writes for it goes through `fit_native_runtime`; a version folder
checked before the server sees it goes through `check_native_runtime`. Kept apart from the build
script, whose own bytes are part of its build cache key.
"""

from __future__ import annotations

from common.errors import MMRankError
from export.native_backend import ORT_VERSION

MAX_IR_VERSION, MAX_OPSET = 10, 21  # what ONNX Runtime 1.19 reads


def _default_opset(model) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def fit_native_runtime(model):
    """`model` (an onnx.ModelProto, changed in place and returned) readable by ONNX Runtime 1.19: IR
    version lowered to 10 where newer (the `onnx` package writes its own latest by default; no operator
    up to opset 21 needs more). MMRankError when an operator set is newer than opset 21."""
    opset = _default_opset(model)
    if opset is not None and opset > MAX_OPSET:
        raise MMRankError(
            f"the graph uses ONNX opset {opset}; the native backend's ONNX Runtime {ORT_VERSION} "
            f"reads up to opset {MAX_OPSET}"
        )
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    return model


def check_native_runtime(model, where: str) -> None:
    """MMRankError naming `where` unless the native backend's ONNX Runtime reads `model` (its IR version
    and opset; the venv's onnxruntime may read newer ones, the server's does not)."""
    opset = _default_opset(model)
    if model.ir_version > MAX_IR_VERSION or (opset is not None and opset > MAX_OPSET):
        raise MMRankError(
            f"{where}: IR version {model.ir_version}, opset {opset}; the native backend's ONNX Runtime "
            f"{ORT_VERSION} reads up to IR version {MAX_IR_VERSION} and opset {MAX_OPSET}"
        )
