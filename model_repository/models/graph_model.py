"""Triton Python-backend model that runs one exported ONNX graph with onnxruntime.

Rendered as `<model>/1/model.py` next to `model.onnx` (the file named by the `onnx_file` parameter) and
the runtime package.
GPU instances use the CUDA execution provider when onnxruntime has it, CPU instances the CPU one.
Requests of equal input shapes are concatenated along the batch axis and run as one call; the
outputs are split back, one response per request, in request order.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the runtime package copied next to this file

import triton_python_backend_utils as pb_utils  # noqa: E402

from model_repository.ort_graph import OrtGraph  # noqa: E402
from model_repository.responses import output_dtypes, respond_grouped  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        folder = Path(args["model_repository"]) / args["model_version"]
        onnx_file = config["parameters"]["onnx_file"]["string_value"]
        device = "gpu" if args["model_instance_kind"] == "GPU" else "cpu"
        self.graph = OrtGraph(folder / onnx_file, device, int(args["model_instance_device_id"]))
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = output_dtypes(pb_utils, config)

    def _read(self, request):
        return {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}

    def execute(self, requests):
        return respond_grouped(pb_utils, requests, self.outputs, self._read, self.graph.run)
