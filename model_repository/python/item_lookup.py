"""Triton Python-backend model: request ids -> the ranking graph's inputs, from the item table.

Rendered as `item_lookup/<version>/model.py` next to `item_table/`; each version folder is one table,
so a new table is served by adding a version (export/repository.py `add_table_version`). The lookup
itself, and its fallback for unknown ids, is `export.item_table.rank_inputs`. Outputs are whatever the
config lists (the ranking graph's inputs plus candidate_known), with the dtypes the config gives.
"""

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from export.backend_responses import respond_each
from export.item_table import ItemTable, LookupConfig, rank_inputs


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        folder = Path(args["model_repository"]) / args["model_version"]
        self.table = ItemTable.read(folder / "item_table")
        self.lookup = LookupConfig(**json.loads(config["parameters"]["lookup"]["string_value"]))
        self.outputs = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}
        # A per-row scalar (user_id) travels as [batch, 1].
        self.per_row = {o["name"] for o in config["output"] if [int(d) for d in o["dims"]] == [1]}

    def _optional(self, request, name):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    def _lookup(self, request):
        products = rank_inputs(
            self.table,
            self.lookup,
            pb_utils.get_input_tensor_by_name(request, "history_ids").as_numpy(),
            pb_utils.get_input_tensor_by_name(request, "candidate_ids").as_numpy(),
            self._optional(request, "user_id"),
            self._optional(request, "user_feats"),
        )
        return {
            name: products[name][:, None]
            if name in self.per_row and products[name].ndim == 1
            else products[name]
            for name in self.outputs
        }

    def execute(self, requests):
        return respond_each(pb_utils, requests, self.outputs, self._lookup)
