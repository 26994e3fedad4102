"""gRPC client of `rank`: `rank(history_ids, candidate_ids, user_id=None) -> Ranking`.

A Ranking is (scores, known, item_table_version, user_known): `known` is False for candidates the item
table does not hold, which the server scores -inf (ranked last); with `ClientConfig(unknown_ids="raise")`
such a request raises a RankingError naming them instead. `item_table_version` is the table version that
answered (after a publish, the new one once the server has loaded it); `user_known` is False where the
user_id is not one the model knows, and where none was sent: either way the scores are the unknown
user's. Sync and asyncio flavours share input checking, request building and response reading.
UNAVAILABLE (server starting, restarting or overloaded) is retried with exponential backoff; every other
failure raises a RankingError that says what was wrong (bad ids, server down, model missing, timeout).

The client speaks Triton's gRPC protocol through the generated stubs tritonclient ships: the ids go
straight into the request message and the outputs come back as arrays over the response's bytes, one
layer thinner than tritonclient's `infer` and its per-tensor InferInput and InferResult objects
(benchmarks/serving_overhead.py times this client's own work and its calls beside tritonclient's).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from common.errors import MMRankError

HISTORY, CANDIDATES, USER, SCORES = "history_ids", "candidate_ids", "user_id", "scores"
KNOWN = "candidate_known"  # False where the item table has no row for a candidate (scored -inf)
USER_KNOWN, TABLE_VERSION = "user_known", "item_table_version"  # per request
UNKNOWN_IDS = ("flag", "raise")
PAD_ID = 0  # an empty history is sent as one padding id, which the lookup step masks out
OUTPUTS = {  # what `rank` answers, in the datatype it answers it
    SCORES: ("FP32", np.dtype(np.float32)),  # per candidate
    KNOWN: ("BOOL", np.dtype(np.bool_)),  # per candidate
    USER_KNOWN: ("BOOL", np.dtype(np.bool_)),  # per request
    TABLE_VERSION: ("INT64", np.dtype(np.int64)),  # per request
}
MAX_MESSAGE = 2**31 - 1  # gRPC's default receive limit (4 MiB) would refuse a large candidate set's answer
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
)


class RankingError(MMRankError):
    pass


class Ranking(NamedTuple):
    scores: np.ndarray  # [N] float32 logits in candidate order; -inf for unknown candidates
    known: np.ndarray  # [N] bool: False where the item table has no row for the candidate
    item_table_version: int  # the item table version that answered
    user_known: bool  # False for a user_id the model does not know, and without one


@dataclass(frozen=True)
class ClientConfig:
    url: str = "127.0.0.1:8001"
    model: str = "rank"
    timeout_s: float = 5.0  # per attempt
    retries: int = 3  # extra attempts on UNAVAILABLE
    backoff_s: float = 0.2  # doubles each retry
    unknown_ids: str = "flag"  # flag: return them with known False; raise: RankingError naming them

    def __post_init__(self):
        if self.unknown_ids not in UNKNOWN_IDS:
            raise RankingError(f"unknown_ids must be one of {UNKNOWN_IDS}, got {self.unknown_ids!r}")


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


def parse_id_list(text: str, name: str) -> list[int]:
    """'1, 2,3' -> [1, 2, 3]; the CLI's --history may be empty."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        return [int(p) for p in parts]
    except ValueError as e:
        raise RankingError(f"{name}: {e}") from e


def checked(history, candidates, user_id: int | None) -> list[tuple[str, np.ndarray]]:
    """The request's tensors, checked before anything is sent: a bad id is named as such, even when the
    server is down."""
    tensors = [
        (HISTORY, as_ids(history, HISTORY, allow_empty=True)),
        (CANDIDATES, as_ids(candidates, CANDIDATES, allow_empty=False)),
    ]
    if user_id is not None:  # without it the lookup step uses the unknown-user row
        tensors.append((USER, as_ids([user_id], USER, allow_empty=False)))
    return tensors


def infer_request(model: str, tensors: list[tuple[str, np.ndarray]], batched: bool) -> pb.ModelInferRequest:
    """One user's request; `batched`: the model takes a leading batch axis (a request is [1, ...])."""
    request = pb.ModelInferRequest(model_name=model)
    for name, arr in tensors:
        request.inputs.add(name=name, datatype="INT64", shape=(1, arr.size) if batched else (arr.size,))
        request.raw_input_contents.append(arr.tobytes())
    for name in OUTPUTS:
        request.outputs.add(name=name)
    return request


def response_outputs(response: pb.ModelInferResponse, model: str) -> dict[str, np.ndarray]:
    """{output: flat array} of a response, each checked against the datatype `rank` answers it in."""
    if len(response.raw_output_contents) != len(response.outputs):
        raise RankingError(
            f"response of {model!r} carries {len(response.raw_output_contents)} output buffers for "
            f"{len(response.outputs)} outputs"
        )
    out = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        if tensor.name not in OUTPUTS:
            continue
        datatype, dtype = OUTPUTS[tensor.name]
        if tensor.datatype != datatype:
            raise RankingError(
                f"output {tensor.name!r} of {model!r} is {tensor.datatype}, expected {datatype}"
            )
        if len(raw) != math.prod(tensor.shape) * dtype.itemsize:
            raise RankingError(
                f"output {tensor.name!r} of {model!r}: {len(raw)} bytes for shape {list(tensor.shape)}"
            )
        out[tensor.name] = np.frombuffer(raw, dtype).copy()  # a writable array the caller owns
    missing = [name for name in OUTPUTS if name not in out]
    if missing:
        raise RankingError(f"response of {model!r} has no {missing} output (is {model!r} the rank model?)")
    return out


def batched_from(metadata: pb.ModelMetadataResponse) -> bool:
    for t in metadata.inputs:
        if t.name == CANDIDATES:
            return len(t.shape) == 2
    raise RankingError(f"model {metadata.name!r} has no input named {CANDIDATES!r}")


def _is_unavailable(err: grpc.RpcError) -> bool:
    return err.code() == grpc.StatusCode.UNAVAILABLE


def _describe(err: grpc.RpcError, cfg: ClientConfig) -> RankingError:
    code, msg = err.code(), err.details()
    if code == grpc.StatusCode.UNAVAILABLE:
        return RankingError(f"Triton at {cfg.url} is unavailable (is `mmrank serve` running?): {msg}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return RankingError(f"no answer from {cfg.url} within {cfg.timeout_s}s")
    return RankingError(f"model {cfg.model!r} at {cfg.url}: {msg}")


class _Base:
    def __init__(self, cfg: ClientConfig, channel):
        self.cfg = cfg
        self._channel = channel
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        self._batched: bool | None = None

    def _ranking(self, response: pb.ModelInferResponse, candidates: np.ndarray) -> Ranking:
        out = response_outputs(response, self.cfg.model)
        n = len(candidates)
        if out[SCORES].size != n:
            raise RankingError(f"got {out[SCORES].size} scores for {n} candidates")
        ranking = Ranking(out[SCORES], out[KNOWN][:n], int(out[TABLE_VERSION][0]), bool(out[USER_KNOWN][0]))
        if self.cfg.unknown_ids == "raise" and not ranking.known.all():
            unknown = candidates[~ranking.known]
            raise RankingError(
                f"{len(unknown)} candidate ids are not in the item table: {unknown[:10].tolist()}"
            )
        return ranking


class RankingClient(_Base):
    """Blocking client. `with RankingClient(ClientConfig(url=...)) as c: c.rank([1, 2], [3, 4, 5])`."""

    def __init__(self, cfg: ClientConfig = ClientConfig()):
        super().__init__(cfg, grpc.insecure_channel(cfg.url, options=CHANNEL_OPTIONS))

    def _call(self, method, request):
        delay = self.cfg.backoff_s
        for attempt in range(self.cfg.retries + 1):
            try:
                return method(request, timeout=self.cfg.timeout_s)
            except grpc.RpcError as e:
                if not _is_unavailable(e) or attempt == self.cfg.retries:
                    raise _describe(e, self.cfg) from e
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def ready(self) -> bool:
        try:
            return self._call(self._stub.ModelReady, pb.ModelReadyRequest(name=self.cfg.model)).ready
        except RankingError:
            return False

    def rank(self, history_ids, candidate_ids, user_id: int | None = None) -> Ranking:
        """Scores [N] (logits) and known flags of the candidates in their order, the table version that
        answered and whether the user is known."""
        tensors = checked(history_ids, candidate_ids, user_id)
        if self._batched is None:
            meta = self._call(self._stub.ModelMetadata, pb.ModelMetadataRequest(name=self.cfg.model))
            self._batched = batched_from(meta)
        request = infer_request(self.cfg.model, tensors, self._batched)
        return self._ranking(self._call(self._stub.ModelInfer, request), tensors[1][1])

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncRankingClient(_Base):
    """asyncio client with the same contract; use inside a running event loop."""

    def __init__(self, cfg: ClientConfig = ClientConfig()):
        super().__init__(cfg, grpc.aio.insecure_channel(cfg.url, options=CHANNEL_OPTIONS))

    async def _call(self, method, request):
        delay = self.cfg.backoff_s
        for attempt in range(self.cfg.retries + 1):
            try:
                return await method(request, timeout=self.cfg.timeout_s)
            except grpc.RpcError as e:
                if not _is_unavailable(e) or attempt == self.cfg.retries:
                    raise _describe(e, self.cfg) from e
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    async def rank(self, history_ids, candidate_ids, user_id: int | None = None) -> Ranking:
        tensors = checked(history_ids, candidate_ids, user_id)
        if self._batched is None:
            meta = await self._call(self._stub.ModelMetadata, pb.ModelMetadataRequest(name=self.cfg.model))
            self._batched = batched_from(meta)
        request = infer_request(self.cfg.model, tensors, self._batched)
        return self._ranking(await self._call(self._stub.ModelInfer, request), tensors[1][1])

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
