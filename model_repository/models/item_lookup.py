"""Triton Python-backend model: request ids -> the ranking graph's inputs, from the item table.

Rendered as `item_lookup/<version>/model.py` next to `item_table/` and the runtime package; each version
folder is one table, so a new table is served by adding a version (export/repository.py
`add_table_version`). A version whose table does not read or has the wrong widths serves the newest
valid older table instead (and logs which it skipped), so a bad table never blocks a (re)start. Each request is first checked against the limits of the config's `limits`
parameter (model_repository/limits.py), then looked up (`item_table.rank_inputs`, which documents the
fallback for unknown ids). Outputs are whatever the config lists (the ranking graph's inputs plus
candidate_known), with the dtypes the config gives.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the runtime package copied next to this file

import triton_python_backend_utils as pb_utils  # noqa: E402

from model_repository.item_table import (  # noqa: E402
    CANDIDATE_C,
    CANDIDATE_ITEM,
    LookupConfig,
    newest_valid_table,
    rank_inputs,
)
from model_repository.limits import RequestLimits  # noqa: E402
from model_repository.responses import output_dtypes, respond_each  # noqa: E402

INPUTS = ("history_ids", "candidate_ids", "user_id", "user_feats")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: json.loads(v["string_value"]) for k, v in config["parameters"].items()}
        widths = {o["name"]: int(o["dims"][-1]) for o in config["output"]}
        self.table, served, skipped = newest_valid_table(
            args["model_repository"],
            int(args["model_version"]),
            widths.get(CANDIDATE_C, 0),
            widths.get(CANDIDATE_ITEM, 0),
        )
        for line in skipped:  # the server log says which table serves in this version's place
            pb_utils.Logger.log_warn(
                f"item_lookup version {args['model_version']}: {line}; serving version {served}"
            )
        self.lookup = LookupConfig(**params["lookup"])
        self.limits = RequestLimits(**params.get("limits", {}))
        self.outputs = output_dtypes(pb_utils, config)
        # A per-row scalar (user_id) travels as [batch, 1].
        self.per_row = {o["name"] for o in config["output"] if [int(d) for d in o["dims"]] == [1]}

    def _lookup(self, request):
        tensors = {name: pb_utils.get_input_tensor_by_name(request, name) for name in INPUTS}
        inputs = {name: None if t is None else t.as_numpy() for name, t in tensors.items()}
        self.limits.check(inputs)
        products = rank_inputs(self.table, self.lookup, *(inputs[name] for name in INPUTS))
        return {
            name: products[name][:, None]
            if name in self.per_row and products[name].ndim == 1
            else products[name]
            for name in self.outputs
        }

    def execute(self, requests):
        return respond_each(pb_utils, requests, self.outputs, self._lookup)
