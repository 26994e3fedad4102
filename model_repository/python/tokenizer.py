"""Triton Python-backend model: item text fields (BYTES [K]) -> the text encoder graph's inputs.

Rendered as `tokenizer/1/model.py` next to `tokenizer/` (the exported tokenizer files). The layout
(one text per field, or the fields joined) and the token limit come from the config parameters; the
tokenization itself is `export.text_inputs.ItemTokenizer`. Outputs: input_ids, attention_mask
[K', T] and text_mask [K'] per item, T = the longest text of the request.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from export.text_inputs import ItemTokenizer


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: json.loads(v["string_value"]) for k, v in config["parameters"].items()}
        folder = Path(args["model_repository"]) / args["model_version"] / "tokenizer"
        self.tokenizer = ItemTokenizer(folder, int(params["max_length"]), bool(params["join_fields"]))
        self.outputs = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                fields = pb_utils.get_input_tensor_by_name(request, "text").as_numpy()
                ids, mask, present = self.tokenizer(fields)
                values = {"input_ids": ids, "attention_mask": mask, "text_mask": present}
                tensors = [
                    pb_utils.Tensor(n, np.ascontiguousarray(values[n], dtype=t))
                    for n, t in self.outputs.items()
                ]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except Exception as e:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
        return responses
