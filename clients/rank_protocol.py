"""What `rank` takes and answers, whatever the transport: the tensor names, the ids checked before
anything is sent, and each output checked against the datatype and size `rank` answers it in.

The gRPC and HTTP transports (clients/grpc_transport.py, clients/http_transport.py) encode the same
checked tensors and hand back the same checked outputs; clients/ranking_client.py sits on top.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from common.errors import MMRankError

HISTORY, CANDIDATES, USER, SCORES = "history_ids", "candidate_ids", "user_id", "scores"
KNOWN = "candidate_known"  # False where the item table has no row for a candidate (scored -inf)
USER_KNOWN, TABLE_VERSION = "user_known", "item_table_version"  # per request
PAD_ID = 0  # an empty history is sent as one padding id, which the lookup step masks out
OUTPUTS = {  # what `rank` answers, in the datatype it answers it
    SCORES: ("FP32", np.dtype(np.float32)),  # per candidate
    KNOWN: ("BOOL", np.dtype(np.bool_)),  # per candidate
    USER_KNOWN: ("BOOL", np.dtype(np.bool_)),  # per request
    TABLE_VERSION: ("INT64", np.dtype(np.int64)),  # per request
}
Tensors = list[tuple[str, np.ndarray]]


class RankingError(MMRankError):
    pass


class Unavailable(Exception):
    """The server did not take the call (down, starting, restarting, overloaded): worth another try. The
    client retries it with backoff and, when the tries are spent, raises a RankingError naming it."""


class Transport:
    """What a transport knows of its server, and its words for a call that failed there."""

    def __init__(self, url: str, model: str, timeout_s: float):
        self.url, self.model, self.timeout_s = url, model, timeout_s

    def no_answer(self) -> RankingError:
        return RankingError(f"no answer from {self.url} within {self.timeout_s}s")

    def refused(self, message: str) -> RankingError:
        return RankingError(f"model {self.model!r} at {self.url}: {message}")


def as_ids(values: Sequence[int] | np.ndarray, name: str, allow_empty: bool) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise RankingError(f"{name} must be a flat list of item ids, got shape {arr.shape}")
    if arr.size == 0:
        if not allow_empty:
            raise RankingError(f"{name} is empty: nothing to rank")
        return np.array([PAD_ID], dtype=np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise RankingError(f"{name} must hold integer item ids, got {arr.dtype}")
    # A negative id is one more id the item table does not hold: the server flags it (candidate_known).
    return arr.astype(np.int64)


def checked(history, candidates, user_id: int | None) -> Tensors:
    """The request's tensors, checked before anything is sent: a bad id is named as such, even when the
    server is down."""
    tensors = [
        (HISTORY, as_ids(history, HISTORY, allow_empty=True)),
        (CANDIDATES, as_ids(candidates, CANDIDATES, allow_empty=False)),
    ]
    if user_id is not None:  # without it the lookup step uses the unknown-user row
        tensors.append((USER, as_ids([user_id], USER, allow_empty=False)))
    return tensors


def input_shape(arr: np.ndarray, batched: bool) -> list[int]:
    """One user's request; `batched`: the model takes a leading batch axis (a request is [1, ...])."""
    return [1, arr.size] if batched else [arr.size]


def output_array(name: str, datatype: str, shape: Sequence[int], raw: bytes, model: str) -> np.ndarray:
    """A flat writable array over an output's raw bytes, checked against what `rank` answers."""
    want, dtype = OUTPUTS[name]
    if datatype != want:
        raise RankingError(f"output {name!r} of {model!r} is {datatype}, expected {want}")
    if len(raw) != math.prod(shape) * dtype.itemsize:
        raise RankingError(f"output {name!r} of {model!r}: {len(raw)} bytes for shape {list(shape)}")
    return np.frombuffer(raw, dtype).copy()


def all_outputs(out: dict[str, np.ndarray], model: str) -> dict[str, np.ndarray]:
    missing = [name for name in OUTPUTS if name not in out]
    if missing:
        raise RankingError(f"response of {model!r} has no {missing} output (is {model!r} the rank model?)")
    return out


def batched_from(inputs: Iterable[tuple[str, Sequence[int]]], model: str) -> bool:
    """Whether the model's inputs, (name, shape) as its metadata lists them, take a batch axis."""
    for name, shape in inputs:
        if name == CANDIDATES:
            return len(shape) == 2
    raise RankingError(f"model {model!r} has no input named {CANDIDATES!r}")
