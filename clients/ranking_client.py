"""gRPC client of the `rank` ensemble: `rank(history_ids, candidate_ids, user_id=None) -> Ranking`.

A Ranking is (scores, known, item_table_version, user_known): `known` is False for candidates the item
table does not hold, which the server scores -inf (ranked last); with `ClientConfig(unknown_ids="raise")`
such a request raises a RankingError naming them instead. `item_table_version` is the table version that
answered (after a publish, the new one once the server has loaded it); `user_known` is False where the
user_id is not one the model knows, and where none was sent: either way the scores are the unknown
user's. Sync and asyncio flavours share input checking and request building. UNAVAILABLE (server starting,
restarting or overloaded) is retried with exponential backoff; every other failure raises a
RankingError that says what was wrong (bad ids, server down, model missing, timeout).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from common.errors import MMRankError

HISTORY, CANDIDATES, USER, SCORES = "history_ids", "candidate_ids", "user_id", "scores"
KNOWN = "candidate_known"  # False where the item table has no row for a candidate (scored -inf)
USER_KNOWN, TABLE_VERSION = "user_known", "item_table_version"  # per request
UNKNOWN_IDS = ("flag", "raise")
PAD_ID = 0  # an empty history is sent as one padding id, which the lookup step masks out


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


def _is_unavailable(err: Exception) -> bool:
    status = getattr(err, "status", lambda: None)() or ""
    return "UNAVAILABLE" in str(status)


def _describe(err: Exception, cfg: ClientConfig) -> RankingError:
    status = str(getattr(err, "status", lambda: None)() or "")
    msg = getattr(err, "message", lambda: str(err))() or str(err)
    if "UNAVAILABLE" in status:
        return RankingError(f"Triton at {cfg.url} is unavailable (is `mmrank serve` running?): {msg}")
    if "DEADLINE_EXCEEDED" in status:
        return RankingError(f"no answer from {cfg.url} within {cfg.timeout_s}s")
    return RankingError(f"model {cfg.model!r} at {cfg.url}: {msg}")


class _Base:
    def __init__(self, cfg: ClientConfig, client):
        self.cfg = cfg
        self._client = client
        self._batched: bool | None = None

    @staticmethod
    def _checked(history, candidates, user_id: int | None) -> list[tuple[str, np.ndarray]]:
        """The request's tensors, checked before anything is sent: a bad id is named as such, even
        when the server is down."""
        tensors = [
            (HISTORY, as_ids(history, HISTORY, allow_empty=True)),
            (CANDIDATES, as_ids(candidates, CANDIDATES, allow_empty=False)),
        ]
        if user_id is not None:  # without it the lookup step uses the unknown-user row
            tensors.append((USER, as_ids([user_id], USER, allow_empty=False)))
        return tensors

    def _inputs(self, tensors: list[tuple[str, np.ndarray]]) -> list:
        out = []
        for name, arr in tensors:
            arr = arr[None, :] if self._batched else arr
            inp = self._module.InferInput(name, list(arr.shape), "INT64")
            inp.set_data_from_numpy(arr)
            out.append(inp)
        return out

    @staticmethod
    def _batched_from(metadata) -> bool:
        for t in metadata.inputs:
            if t.name == CANDIDATES:
                return len(t.shape) == 2
        raise RankingError(f"model has no input named {CANDIDATES!r}")

    def _scores(self, result, n: int) -> np.ndarray:
        scores = result.as_numpy(SCORES)
        if scores is None:
            raise RankingError(f"response has no {SCORES!r} output")
        scores = scores.reshape(-1)
        if scores.size != n:
            raise RankingError(f"got {scores.size} scores for {n} candidates")
        return scores.astype(np.float32)

    def _output(self, result, name: str) -> np.ndarray:
        value = result.as_numpy(name)
        if value is None:
            raise RankingError(f"response has no {name!r} output (is {self.cfg.model!r} the rank ensemble?)")
        return value.reshape(-1)

    def _ranking(self, result, candidates, n: int) -> Ranking:
        ranking = Ranking(
            self._scores(result, n),
            self._output(result, KNOWN).astype(bool)[:n],
            int(self._output(result, TABLE_VERSION)[0]),
            bool(self._output(result, USER_KNOWN)[0]),
        )
        if self.cfg.unknown_ids == "raise" and not ranking.known.all():
            unknown = np.asarray(candidates)[~ranking.known]
            raise RankingError(
                f"{len(unknown)} candidate ids are not in the item table: {unknown[:10].tolist()}"
            )
        return ranking

    def _outputs(self) -> list:
        return [
            self._module.InferRequestedOutput(name) for name in (SCORES, KNOWN, USER_KNOWN, TABLE_VERSION)
        ]


class RankingClient(_Base):
    """Blocking client. `with RankingClient(ClientConfig(url=...)) as c: c.rank([1, 2], [3, 4, 5])`."""

    def __init__(self, cfg: ClientConfig = ClientConfig()):
        import tritonclient.grpc as grpcclient

        self._module = grpcclient
        super().__init__(cfg, grpcclient.InferenceServerClient(url=cfg.url))

    def _call(self, fn, *args, **kwargs):
        from tritonclient.utils import InferenceServerException

        delay = self.cfg.backoff_s
        for attempt in range(self.cfg.retries + 1):
            try:
                return fn(*args, client_timeout=self.cfg.timeout_s, **kwargs)
            except InferenceServerException as e:
                if not _is_unavailable(e) or attempt == self.cfg.retries:
                    raise _describe(e, self.cfg) from e
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def ready(self) -> bool:
        try:
            return bool(self._call(self._client.is_model_ready, self.cfg.model))
        except RankingError:
            return False

    def rank(self, history_ids, candidate_ids, user_id: int | None = None) -> Ranking:
        """Scores [N] (logits) and known flags of the candidates in their order, the table version that
        answered and whether the user is known."""
        tensors = self._checked(history_ids, candidate_ids, user_id)
        if self._batched is None:
            self._batched = self._batched_from(self._call(self._client.get_model_metadata, self.cfg.model))
        result = self._call(
            self._client.infer, self.cfg.model, self._inputs(tensors), outputs=self._outputs()
        )
        return self._ranking(result, candidate_ids, len(tensors[1][1]))

    def close(self) -> None:
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncRankingClient(_Base):
    """asyncio client with the same contract; use inside a running event loop."""

    def __init__(self, cfg: ClientConfig = ClientConfig()):
        import tritonclient.grpc.aio as aioclient

        self._module = aioclient
        super().__init__(cfg, aioclient.InferenceServerClient(url=cfg.url))

    async def _call(self, fn, *args, **kwargs):
        from tritonclient.utils import InferenceServerException

        delay = self.cfg.backoff_s
        for attempt in range(self.cfg.retries + 1):
            try:
                return await fn(*args, client_timeout=self.cfg.timeout_s, **kwargs)
            except InferenceServerException as e:
                if not _is_unavailable(e) or attempt == self.cfg.retries:
                    raise _describe(e, self.cfg) from e
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    async def rank(self, history_ids, candidate_ids, user_id: int | None = None) -> Ranking:
        tensors = self._checked(history_ids, candidate_ids, user_id)
        if self._batched is None:
            meta = await self._call(self._client.get_model_metadata, self.cfg.model)
            self._batched = self._batched_from(meta)
        inputs = self._inputs(tensors)
        result = await self._call(self._client.infer, self.cfg.model, inputs, outputs=self._outputs())
        return self._ranking(result, candidate_ids, len(tensors[1][1]))

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
