"""Triton Python-backend model: request ids -> scores, from the item table and the ranking graph.

Rendered as `item_lookup/<version>/model.py` next to `item_table/` and the runtime package; each version
folder is one table, so a new table is served by adding a version (export/repository.py
`add_table_version`). A version whose table does not read or has the wrong widths serves the newest
valid older table instead (and logs which it skipped), so a bad table never blocks a (re)start; the
`item_table_version` output says which table answered. Each request is first checked against the limits
of the config's `limits` parameter (model_repository/limits.py), then looked up
(`item_table.rank_inputs`, which documents the fallback for unknown ids and users). With a `graph`
parameter (the python backend) the ranking graph in the version folder scores the products; with a
`program` parameter (the torch backend) the torch program in the version folder does, on the instance's
GPU (model_repository/torch_ranker.py; tensors cross the stub through DLPack, never NumPy's buffer
protocol). Outputs: scores, candidate_known, user_known and item_table_version (per row, [B, 1]); dtypes
are the config's. The native backends serve the same lookup as an ONNX graph (export/lookup_graph.py).
"""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the runtime package copied next to this file

import triton_python_backend_utils as pb_utils  # noqa: E402

from model_repository.item_table import (  # noqa: E402
    CANDIDATE_KNOWN,
    TABLE_VERSION,
    USER_KNOWN,
    LookupConfig,
    newest_valid_table,
    rank_inputs,
)
from model_repository.limits import RequestLimits  # noqa: E402
from model_repository.ort_graph import OrtGraph  # noqa: E402
from model_repository.responses import output_dtypes, respond_grouped  # noqa: E402

INPUTS = ("history_ids", "candidate_ids", "user_id", "user_feats")


def _numpy_array(tensor):
    return tensor.as_numpy()


def _dlpack_array(tensor):
    """The torch backend's input read: torch's own NumPy bridge, whatever NumPy the stub was built with."""
    from torch.utils.dlpack import from_dlpack

    return from_dlpack(tensor.to_dlpack()).numpy()


def _dlpack_tensor(name, array):
    import torch
    from torch.utils.dlpack import to_dlpack

    return pb_utils.Tensor.from_dlpack(name, to_dlpack(torch.from_numpy(array)))


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config["parameters"].items()}
        folder = Path(args["model_repository"]) / args["model_version"]
        widths = json.loads(params["table_widths"])
        self.table, self.served, skipped = newest_valid_table(
            args["model_repository"], int(args["model_version"]), widths["d"], widths["item_dim"]
        )
        for line in skipped:  # the server log says which table serves in this version's place
            pb_utils.Logger.log_warn(
                f"item_lookup version {args['model_version']}: {line}; serving version {self.served}"
            )
        self.lookup = LookupConfig(**json.loads(params["lookup"]))
        self.limits = RequestLimits(**json.loads(params.get("limits", "{}")))
        self.outputs = output_dtypes(pb_utils, config)
        # The ranking graph (python backend) or program (torch backend) runs here, in the same step (one
        # Python hop per request).
        self.graph = self.ranker = None
        self._array, self._tensor = _numpy_array, pb_utils.Tensor
        if "graph" in params:
            self.graph = OrtGraph(folder / params["graph"], threads=int(params.get("graph_threads", "0")))
        if "program" in params:
            self.ranker = self._torch_ranker(folder, params, int(args.get("model_instance_device_id", "0")))
            self._array, self._tensor = _dlpack_array, _dlpack_tensor

    def _torch_ranker(self, folder, params, device_id):
        from model_repository.torch_ranker import TorchRanker

        ranker = TorchRanker.from_params(folder, params, self.table, self.lookup, device_id)
        pb_utils.Logger.log_info(
            f"item_lookup: torch program on {ranker.device} ({ranker.dtype}), "
            f"{len(ranker.captured)} CUDA graphs of {len(ranker.buckets)} buckets"
        )
        return ranker

    def _read(self, request):
        tensors = {name: pb_utils.get_input_tensor_by_name(request, name) for name in INPUTS}
        inputs = {name: None if t is None else self._array(t) for name, t in tensors.items()}
        self.limits.check(inputs)  # per request, before any graph runs
        return inputs

    def _lookup(self, inputs):
        if self.ranker is not None:
            scores, known, user_known = self.ranker.score(*(inputs[name] for name in INPUTS))
            out = {"scores": scores.numpy(), CANDIDATE_KNOWN: known}
        else:
            products = rank_inputs(self.table, self.lookup, *(inputs[name] for name in INPUTS))
            out = {**self.graph.run(products), CANDIDATE_KNOWN: products[CANDIDATE_KNOWN]}
            user_known = products[USER_KNOWN]
        # Per row, [B, 1]: a batching model's [batch] tensor travels as [batch, 1].
        out[USER_KNOWN] = user_known[:, None]
        out[TABLE_VERSION] = np.full((len(user_known), 1), self.served, np.int64)
        return out

    def execute(self, requests):
        # Requests of equal shapes (e.g. several users' N candidates and L-item histories) are looked up
        # and scored as one batch.
        return respond_grouped(pb_utils, requests, self.outputs, self._read, self._lookup, self._tensor)
