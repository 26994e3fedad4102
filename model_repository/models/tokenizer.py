"""Triton Python-backend model: item text fields (BYTES [K]) -> the text encoder graph's inputs.

Rendered as `tokenizer/1/model.py` next to `tokenizer/` (the exported tokenizer files) and the runtime
package. The layout (one text per field, or the fields joined) and the token limit come from the config
parameters; each request is first checked against the bounds of the `limits` parameter
(model_repository/limits.py EncodeLimits: items, bytes per text field), then tokenized by
`model_repository.text_inputs.ItemTokenizer`. Outputs: input_ids, attention_mask [K', T] and
text_mask [K'] per item, T = the longest text of the request.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the runtime package copied next to this file

import triton_python_backend_utils as pb_utils  # noqa: E402

from model_repository.limits import EncodeLimits  # noqa: E402
from model_repository.responses import output_dtypes, respond_each  # noqa: E402
from model_repository.text_inputs import ItemTokenizer  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: json.loads(v["string_value"]) for k, v in config["parameters"].items()}
        folder = Path(args["model_repository"]) / args["model_version"] / "tokenizer"
        self.tokenizer = ItemTokenizer(folder, int(params["max_length"]), bool(params["join_fields"]))
        self.limits = EncodeLimits(**params.get("limits", {}))
        self.outputs = output_dtypes(pb_utils, config)

    def _tokenize(self, request):
        fields = pb_utils.get_input_tensor_by_name(request, "text").as_numpy()
        self.limits.check_texts(fields)  # per request, before anything is decoded or tokenized
        ids, mask, present = self.tokenizer(fields)
        return {"input_ids": ids, "attention_mask": mask, "text_mask": present}

    def execute(self, requests):
        return respond_each(pb_utils, requests, self.outputs, self._tokenize)
