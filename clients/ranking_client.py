"""Client of `rank`: `rank(history_ids, candidate_ids, user_id=None) -> Ranking`, over gRPC or HTTP.

A Ranking is (scores, known, item_table_version, user_known): `known` is False for candidates the item
table does not hold, which the server scores -inf (ranked last); with `ClientConfig(unknown_ids="raise")`
such a request raises a RankingError naming them instead. `item_table_version` is the table version that
answered (after a publish, the new one once the server has loaded it); `user_known` is False where the
user_id is not one the model knows, and where none was sent: either way the scores are the unknown
user's. Sync and asyncio flavours share input checking and response reading (clients/rank_protocol.py).
An unavailable server (down, starting, restarting or overloaded) is retried with exponential backoff;
every other failure raises a RankingError that says what was wrong (bad ids, server down, model missing,
timeout).

The url picks the protocol: `host:port` or `grpc://host:port` speaks Triton's gRPC protocol
(clients/grpc_transport.py, port 8001 by default on a server), `http://host:port[/prefix]` its HTTP/REST
protocol with binary tensors (clients/http_transport.py, port 8000). Both answer the same Ranking; HTTP
costs the caller less per call from Python (benchmarks/serving_overhead.py times both).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import urlsplit

import numpy as np

from clients.grpc_transport import AsyncGrpcTransport, GrpcTransport
from clients.http_transport import AsyncHttpTransport, HttpTransport
from clients.rank_protocol import (
    KNOWN,
    SCORES,
    TABLE_VERSION,
    USER_KNOWN,
    RankingError,
    Unavailable,
    batched_from,
    checked,
)

UNKNOWN_IDS = ("flag", "raise")


class Ranking(NamedTuple):
    scores: np.ndarray  # [N] float32 logits in candidate order; -inf for unknown candidates
    known: np.ndarray  # [N] bool: False where the item table has no row for the candidate
    item_table_version: int  # the item table version that answered
    user_known: bool  # False for a user_id the model does not know, and without one


class Endpoint(NamedTuple):
    protocol: str  # "grpc" or "http"
    target: str  # gRPC: the channel target; HTTP: host:port
    host: str  # HTTP only
    port: int  # HTTP only
    prefix: str  # HTTP only: a path in front of /v2 (a proxy's route), "" for none


def endpoint(url: str) -> Endpoint:
    scheme, sep, rest = url.partition("://")
    if not sep:  # host:port, as tritonclient takes a gRPC address
        return Endpoint("grpc", url, "", 0, "")
    if scheme == "grpc":
        return Endpoint("grpc", rest, "", 0, "")
    if scheme == "https":
        raise RankingError(
            f"url {url!r}: TLS is not spoken here; end it in front of the client or use http://"
        )
    if scheme != "http":
        raise RankingError(
            f"url {url!r}: unknown scheme {scheme!r}; expected host:port or grpc://host:port for gRPC, "
            "http://host:port for HTTP"
        )
    parts = urlsplit(url)
    try:
        port = parts.port or 80
    except ValueError as e:
        raise RankingError(f"url {url!r}: {e}") from None
    if not parts.hostname or parts.query or parts.fragment:
        raise RankingError(f"url {url!r}: expected http://host:port[/path]")
    return Endpoint("http", parts.netloc, parts.hostname, port, parts.path.rstrip("/"))


@dataclass(frozen=True)
class ClientConfig:
    url: str = "127.0.0.1:8001"  # host:port or grpc://host:port (gRPC), http://host:port[/path] (HTTP)
    model: str = "rank"
    timeout_s: float = 5.0  # per attempt
    retries: int = 3  # extra attempts when the server is unavailable
    backoff_s: float = 0.2  # doubles each retry
    unknown_ids: str = "flag"  # flag: return them with known False; raise: RankingError naming them

    def __post_init__(self):
        if self.unknown_ids not in UNKNOWN_IDS:
            raise RankingError(f"unknown_ids must be one of {UNKNOWN_IDS}, got {self.unknown_ids!r}")
        endpoint(self.url)

    @property
    def endpoint(self) -> Endpoint:
        return endpoint(self.url)


def parse_id_list(text: str, name: str) -> list[int]:
    """'1, 2,3' -> [1, 2, 3]; the CLI's --history may be empty."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        return [int(p) for p in parts]
    except ValueError as e:
        raise RankingError(f"{name}: {e}") from e


def _transport(cfg: ClientConfig, asynchronous: bool):
    ep = cfg.endpoint
    if ep.protocol == "http":
        kind = AsyncHttpTransport if asynchronous else HttpTransport
        return kind(cfg.url, ep.host, ep.port, ep.prefix, cfg.model, cfg.timeout_s)
    kind = AsyncGrpcTransport if asynchronous else GrpcTransport
    return kind(cfg.url, ep.target, cfg.model, cfg.timeout_s)


def _delays(cfg: ClientConfig) -> list[float | None]:
    """The wait before each retry, None after the last attempt."""
    return [cfg.backoff_s * 2**i for i in range(cfg.retries)] + [None]


def _unavailable(cfg: ClientConfig, e: Unavailable) -> RankingError:
    return RankingError(f"Triton at {cfg.url} is unavailable (is `mmrank serve` running?): {e}")


class _Base:
    def __init__(self, cfg: ClientConfig, asynchronous: bool):
        self.cfg = cfg
        self._transport = _transport(cfg, asynchronous)
        self._batched: bool | None = None

    def _ranking(self, out: dict[str, np.ndarray], candidates: np.ndarray) -> Ranking:
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
    """Blocking client, safe to share between threads.
    `with RankingClient(ClientConfig(url=...)) as c: c.rank([1, 2], [3, 4, 5])`."""

    def __init__(self, cfg: ClientConfig = ClientConfig()):
        super().__init__(cfg, asynchronous=False)

    def _call(self, fn, *args):
        for delay in _delays(self.cfg):
            try:
                return fn(*args)
            except Unavailable as e:
                if delay is None:
                    raise _unavailable(self.cfg, e) from e
                time.sleep(delay)
        raise AssertionError("unreachable")

    def ready(self) -> bool:
        try:
            return self._call(self._transport.ready)
        except RankingError:
            return False

    def rank(self, history_ids, candidate_ids, user_id: int | None = None) -> Ranking:
        """Scores [N] (logits) and known flags of the candidates in their order, the table version that
        answered and whether the user is known."""
        tensors = checked(history_ids, candidate_ids, user_id)
        if self._batched is None:
            self._batched = batched_from(self._call(self._transport.inputs), self.cfg.model)
        out = self._call(self._transport.infer, tensors, self._batched)
        return self._ranking(out, tensors[1][1])

    def close(self) -> None:
        self._transport.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncRankingClient(_Base):
    """asyncio client with the same contract; use inside a running event loop."""

    def __init__(self, cfg: ClientConfig = ClientConfig()):
        super().__init__(cfg, asynchronous=True)

    async def _call(self, fn, *args):
        for delay in _delays(self.cfg):
            try:
                return await fn(*args)
            except Unavailable as e:
                if delay is None:
                    raise _unavailable(self.cfg, e) from e
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def ready(self) -> bool:
        try:
            return await self._call(self._transport.ready)
        except RankingError:
            return False

    async def rank(self, history_ids, candidate_ids, user_id: int | None = None) -> Ranking:
        tensors = checked(history_ids, candidate_ids, user_id)
        if self._batched is None:
            self._batched = batched_from(await self._call(self._transport.inputs), self.cfg.model)
        out = await self._call(self._transport.infer, tensors, self._batched)
        return self._ranking(out, tensors[1][1])

    async def close(self) -> None:
        await self._transport.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
