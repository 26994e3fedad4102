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

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from model_repository.ort_graph import OrtGraph  # noqa: E402
from model_repository.responses import error_response, output_dtypes  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        folder = Path(args["model_repository"]) / args["model_version"]
        onnx_file = config["parameters"]["onnx_file"]["string_value"]
        device = "gpu" if args["model_instance_kind"] == "GPU" else "cpu"
        self.graph = OrtGraph(folder / onnx_file, device, int(args["model_instance_device_id"]))
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = output_dtypes(pb_utils, config)

    def execute(self, requests):
        feeds = [
            {name: pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in self.inputs}
            for r in requests
        ]
        groups = {}
        for i, feed in enumerate(feeds):
            groups.setdefault(tuple((n, x.shape[1:]) for n, x in feed.items()), []).append(i)
        responses = [None] * len(requests)
        for members in groups.values():
            batch = {n: np.concatenate([feeds[i][n] for i in members]) for n in self.inputs}
            try:
                out = self.graph.run(batch)
            except Exception as e:  # one failing group answers its own requests with the error
                for i in members:
                    responses[i] = error_response(pb_utils, e)
                continue
            sizes = np.cumsum([len(feeds[i][self.inputs[0]]) for i in members])[:-1]
            parts = {n: np.split(out[n], sizes) for n in self.outputs}
            for j, i in enumerate(members):
                tensors = [pb_utils.Tensor(n, parts[n][j].astype(dtype)) for n, dtype in self.outputs.items()]
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
        return responses
