"""The torch serving backend's ranking step: the lookup and the exported ranking program, on a GPU.

`mmrank repo --backend torch` renders `item_lookup` with a torch program (export/torch_program.py) in
each version folder; this class runs it inside Triton's Python backend:

- the item table's columns (content vectors, item tokens) are resident on the device in the program's
  precision (float16 for ranking.fp16.pt2), loaded once per instance;
- per request only row indices and flags travel: `item_table.lookup_rows` turns ids into table rows on
  the host (small int arrays: binary search, most-recent-L), one host-to-device copy moves them, and the
  gather of content rows runs on the device (`item_table.gather`, the same code as the numpy lookup);
- requests are padded to a bucket (batch, candidates) of `buckets`: padded candidates are unknown
  (scored -inf, cut off), padded users have empty histories (attention gives zeros, never NaN). The
  history axes need no bucket: the lookup always gives the model's L (and long L) slots. On CUDA each
  bucket is captured once as a CUDA graph (gather + program) at load and replayed per request; on the
  CPU, and for a request larger than every bucket, the same function runs eagerly;
- scores come back as one float32 device-to-host copy.

This module is the only part of the runtime that imports torch; only `models/item_lookup.py` imports
it, when the config names a program, so the numpy/onnxruntime repositories never need torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from common.errors import MMRankError
from model_repository import item_table as it

CANDIDATE_AXIS = (it.CANDIDATE_C, it.CANDIDATE_ITEM, it.CANDIDATE_KNOWN)  # products with a candidates axis


@dataclass(frozen=True, order=True)
class Bucket:
    batch: int  # users per call
    candidates: int  # candidates per user

    @classmethod
    def parse(cls, text: str) -> list[Bucket]:
        """ "1x128,1x512,8x512" -> buckets (batch x candidates), sorted by size."""
        try:
            buckets = [cls(*(int(v) for v in part.split("x"))) for part in text.split(",") if part.strip()]
        except (TypeError, ValueError) as e:
            raise MMRankError(f"buckets {text!r}: expected BATCHxCANDIDATES[,...], e.g. 1x128,8x512") from e
        if any(b.batch < 1 or b.candidates < 1 for b in buckets):
            raise MMRankError(f"buckets {text!r}: every size must be >= 1")
        return sorted(set(buckets), key=lambda b: (b.batch * b.candidates, b))


def pick_bucket(buckets: list[Bucket], batch: int, candidates: int) -> Bucket | None:
    """The smallest bucket that holds `batch` users of `candidates` candidates, or None."""
    return next((b for b in buckets if b.batch >= batch and b.candidates >= candidates), None)


def pad_to(products: dict[str, np.ndarray], bucket: Bucket) -> dict[str, np.ndarray]:
    """Zero-pad every product's batch axis to bucket.batch and the candidates axis (CANDIDATE_AXIS) to
    bucket.candidates: row 0, id 0, False flags, i.e. unknown candidates and empty histories."""
    out = {}
    for name, x in products.items():
        widths = [(0, bucket.batch - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
        if name in CANDIDATE_AXIS:
            widths[1] = (0, bucket.candidates - x.shape[1])
        out[name] = np.pad(x, widths)
    return out


def choose_device(device: str, device_id: int = 0) -> torch.device:
    """ "auto": the instance's GPU where torch sees one, else the CPU; "cuda" insists on a GPU."""
    if device not in ("auto", "cuda", "cpu"):
        raise MMRankError(f"device {device!r}: expected auto, cuda or cpu")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise MMRankError("device 'cuda' asked for, but torch sees no CUDA device")
    return torch.device("cuda", device_id)


def load_program(path: Path, device: torch.device) -> torch.nn.Module:
    """The exported program at `path`, moved to `device`, as a callable module."""
    if not path.is_file():
        raise MMRankError(f"{path}: torch program not found")
    try:
        program = torch.export.load(str(path))
    except Exception as e:  # torch raises several types for corrupt or newer-schema files
        raise MMRankError(
            f"{path}: torch {torch.__version__} cannot load the program ({type(e).__name__}: {e}); "
            "export it with the torch release that serves it"
        ) from e
    if device.type != "cpu":
        program = torch.export.passes.move_to_device_pass(program, device)
    return program.module()


class CapturedBucket:
    """One bucket's gather + program as a CUDA graph: static inputs, copied into per call, replayed."""

    def __init__(self, fn, example: dict[str, Tensor], warmup: int = 2):
        self.static = {name: x.clone() for name, x in example.items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():  # allocations settle before the capture
            for _ in range(warmup):
                fn(self.static)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.out = fn(self.static)

    def __call__(self, inputs: dict[str, np.ndarray]) -> Tensor:
        for name, x in inputs.items():  # host arrays straight into the static inputs: one copy each
            self.static[name].copy_(torch.from_numpy(x), non_blocking=True)
        self.graph.replay()
        return self.out


class TorchRanker:
    """Request ids -> (float32 scores [B, N] on the CPU, candidate_known [B, N], user_known [B])."""

    def __init__(
        self,
        program: Path,
        inputs: list[str],
        table: it.ItemTable,
        lookup: it.LookupConfig,
        device: torch.device,
        buckets: list[Bucket] | None = None,
        cuda_graphs: bool = True,
    ):
        if device.type == "cuda":
            device = torch.device(
                "cuda", torch.cuda.current_device() if device.index is None else device.index
            )
            # streams and graph captures belong to the current device: on GPU 1 of a KIND_GPU group a
            # capture on GPU 0's stream records nothing, and its replays return the capture-time scores
            torch.cuda.set_device(device)
        self.device, self.inputs, self.table, self.lookup = device, list(inputs), table, lookup
        self.module = load_program(program, device)
        floats = [p.dtype for p in self.module.parameters() if p.is_floating_point()]
        self.dtype = floats[0] if floats else torch.float32
        self.columns = {
            name: torch.from_numpy(values).to(device, self.dtype)
            for name, values in (("content", table.content), ("item_rows", table.item_rows))
            if values is not None
        }
        self.buckets = buckets or []
        self.captured = {}
        if cuda_graphs and device.type == "cuda":
            for bucket in self.buckets:
                self.captured[bucket] = CapturedBucket(self._forward, self._upload(self._empty(bucket)))

    @classmethod
    def from_params(
        cls,
        folder: Path,
        params: dict[str, str],
        table: it.ItemTable,
        lookup: it.LookupConfig,
        device_id: int = 0,
    ) -> TorchRanker:
        """As item_lookup's config parameters (program, program_inputs, device, buckets, cuda_graphs) name
        it, for the model version in `folder`."""
        return cls(
            Path(folder) / params["program"],
            json.loads(params["program_inputs"]),
            table,
            lookup,
            choose_device(params.get("device", "auto"), device_id),
            Bucket.parse(params.get("buckets", "")),
            params.get("cuda_graphs", "true") == "true",
        )

    def _forward(self, x: dict[str, Tensor]) -> Tensor:
        """Gather the table rows on the device, then the program (what a CUDA graph captures)."""
        rows = {name: x[name] for name in it.COLUMN_OF if name in x}
        products = {**x, **it.gather(self.columns, rows)}
        return self.module(*(products[name] for name in self.inputs))

    def _empty(self, bucket: Bucket) -> dict[str, np.ndarray]:
        """A request of the bucket's shape with unknown candidates and empty histories."""
        ready, rows = it.lookup_rows(
            self.table,
            self.lookup,
            np.zeros((bucket.batch, 0), np.int64),
            np.zeros((bucket.batch, bucket.candidates), np.int64),
        )
        ready.pop(it.USER_KNOWN)  # a flag of the answer, not a program input
        return {**ready, **rows}

    def _upload(self, products: dict[str, np.ndarray]) -> dict[str, Tensor]:
        return {
            name: torch.from_numpy(np.ascontiguousarray(x)).to(self.device) for name, x in products.items()
        }

    def score(
        self,
        history_ids: np.ndarray,
        candidate_ids: np.ndarray,
        user_id: np.ndarray | None = None,
        user_feats: np.ndarray | None = None,
    ) -> tuple[Tensor, np.ndarray, np.ndarray]:
        ready, rows = it.lookup_rows(self.table, self.lookup, history_ids, candidate_ids, user_id, user_feats)
        user_known = ready.pop(it.USER_KNOWN)
        known = ready[it.CANDIDATE_KNOWN]
        b, n = known.shape
        products = {**ready, **rows}
        bucket = pick_bucket(self.buckets, b, n)
        if bucket is not None:
            products = pad_to(products, bucket)
        with torch.no_grad():
            if bucket in self.captured:
                out = self.captured[bucket](products)
            else:
                out = self._forward(self._upload(products))
        return out[:b, :n].float().cpu(), known, user_known
