"""One onnxruntime session over an exported graph: CUDA where asked for and present, else CPU.

Shared by the parity checks, the latency benchmark and the Triton Python-backend models, so all three
run a graph the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.errors import MMRankError

ORT_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def providers(device: str = "cpu", device_id: int = 0) -> list:
    """Execution providers for `device` ("cpu" or "gpu"): CUDA first when asked for and available."""
    import onnxruntime as ort

    if device == "gpu" and "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtGraph:
    """Run an ONNX file by input name; inputs are cast to the dtypes the graph declares."""

    def __init__(self, path: str | Path, device: str = "cpu", device_id: int = 0, threads: int = 0):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise MMRankError(f"{path}: ONNX graph not found")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0 = onnxruntime's default
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers(device, device_id))
        except Exception as e:  # onnxruntime raises its own exception types for corrupt files
            raise MMRankError(f"{path}: onnxruntime cannot load the graph ({type(e).__name__}: {e})") from e
        self.inputs = {i.name: ORT_TO_NUMPY[i.type] for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = sorted(set(self.inputs) - set(feeds))
        if missing:
            raise MMRankError(f"missing graph inputs {missing}")
        cast = {name: np.ascontiguousarray(feeds[name], dtype=dtype) for name, dtype in self.inputs.items()}
        return dict(zip(self.outputs, self.session.run(self.outputs, cast), strict=True))
