"""Triton Python-backend model: item text fields (BYTES [K]) -> the text encoder graph's inputs.

Rendered as `tokenizer/1/model.py` next to `tokenizer/` (the exported tokenizer files). The layout
(one text per field, or the fields joined) and the token limit come from the config parameters; the
tokenization itself is `export.text_inputs.ItemTokenizer`. Outputs: input_ids, attention_mask
[K', T] and text_mask [K'] per item, T = the longest text of the request.
"""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from export.backend_responses import respond_each
from export.text_inputs import ItemTokenizer


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: json.loads(v["string_value"]) for k, v in config["parameters"].items()}
        folder = Path(args["model_repository"]) / args["model_version"] / "tokenizer"
        self.tokenizer = ItemTokenizer(folder, int(params["max_length"]), bool(params["join_fields"]))
        self.outputs = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}

    def _tokenize(self, request):
        fields = pb_utils.get_input_tensor_by_name(request, "text").as_numpy()
        ids, mask, present = self.tokenizer(fields)
        return {"input_ids": ids, "attention_mask": mask, "text_mask": present}

    def execute(self, requests):
        return respond_each(pb_utils, requests, self.outputs, self._tokenize)
