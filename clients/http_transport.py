"""`rank` over Triton's HTTP/REST protocol (KServe v2 with Triton's binary tensor extension): a JSON
header naming the tensors, then their raw bytes, one request per kept-alive HTTP/1.1 connection.

Per call this is lighter than gRPC from Python: no HTTP/2 framing and no gRPC threads beside the caller,
a small JSON header in and out (benchmarks/serving_overhead.py times both transports). The blocking
transport keeps a pool of sockets (one per caller thread at a time), the asyncio one a pool of streams.
A connection the server closed while idle in the pool fails before any byte of the answer: the request
goes again at once on a new connection, since `rank` reads and changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from urllib.parse import quote

import numpy as np

from clients import http1
from clients.rank_protocol import (
    OUTPUTS,
    RankingError,
    Tensors,
    Transport,
    Unavailable,
    all_outputs,
    input_shape,
    output_array,
)

RECV_BYTES = 256 * 1024
_BINARY = {"binary_data": True}


def infer_body(tensors: Tensors, batched: bool) -> tuple[bytes, int]:
    """The request body (JSON header, then each input's raw bytes) and the JSON header's length."""
    header = {
        "inputs": [
            {
                "name": name,
                "shape": input_shape(arr, batched),
                "datatype": "INT64",
                "parameters": {"binary_data_size": arr.nbytes},
            }
            for name, arr in tensors
        ],
        "outputs": [{"name": name, "parameters": _BINARY} for name in OUTPUTS],
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([head, *(arr.tobytes() for _, arr in tensors)]), len(head)


def _json(data: bytes, what: str) -> dict:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise RankingError(f"{what} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise RankingError(f"{what} is not a JSON object")
    return value


def _header_length(response: http1.Response, model: str) -> int:
    text = response.headers.get("inference-header-content-length")
    if text is None:  # no binary outputs: the whole body is the JSON
        return len(response.body)
    if not text.isdigit() or int(text) > len(response.body):
        raise RankingError(
            f"response of {model!r}: Inference-Header-Content-Length {text!r} for a {len(response.body)}-byte body"
        )
    return int(text)


def _raw(output: dict, body: bytes, pos: int, model: str) -> tuple[bytes, int]:
    """An output's bytes (binary after the JSON header, or its JSON `data`) and the position after it."""
    name = output["name"]
    size = (output.get("parameters") or {}).get("binary_data_size")
    if size is None:
        try:
            return np.asarray(output.get("data", []), OUTPUTS[name][1]).tobytes(), pos
        except (TypeError, ValueError) as e:
            raise RankingError(
                f"response of {model!r}: output {name!r} is not {OUTPUTS[name][0]} data: {e}"
            ) from None
    if not isinstance(size, int) or size < 0 or pos + size > len(body):
        raise RankingError(
            f"response of {model!r}: output {name!r} claims {size!r} bytes past the body's end"
        )
    return body[pos : pos + size], pos + size


def response_outputs(response: http1.Response, model: str) -> dict[str, np.ndarray]:
    """{output: flat array} of an infer response, each checked against the datatype `rank` answers it in."""
    body = response.body
    end = _header_length(response, model)
    header = _json(body[:end], f"the header of {model!r}'s response")
    out, pos = {}, end
    for output in header.get("outputs", []):
        try:
            name, datatype, shape = output["name"], output["datatype"], output["shape"]
        except (KeyError, TypeError):
            raise RankingError(f"response of {model!r}: an output without name, datatype or shape") from None
        if name not in OUTPUTS:
            size = (output.get("parameters") or {}).get("binary_data_size")
            pos += size if isinstance(size, int) else 0
            continue
        raw, pos = _raw(output, body, pos, model)
        out[name] = output_array(name, datatype, shape, raw, model)
    if pos != len(body):
        raise RankingError(f"response of {model!r} carries {len(body) - pos} bytes past its outputs")
    return all_outputs(out, model)


def _error_message(response: http1.Response) -> str:
    try:
        return str(json.loads(response.body)["error"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        text = response.body[:200].decode("utf-8", "replace").strip()
        return f"HTTP {response.status} {response.reason}" + (f": {text}" if text else "")


class _Http(Transport):
    """What both flavours share: the requests' bytes, the answers' status, and what a failure means."""

    def __init__(self, url: str, host: str, port: int, prefix: str, model: str, timeout_s: float):
        super().__init__(url, model, timeout_s)
        self.host, self.port = host, port
        self._authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._path = f"{prefix}/v2/models/{quote(model, safe='')}"

    def _request(self, method: str, suffix: str = "", body: bytes = b"", headers=None) -> bytes:
        return http1.request(method, self._path + suffix, self._authority, body, headers)

    def _infer_request(self, tensors: Tensors, batched: bool) -> bytes:
        body, header_length = infer_body(tensors, batched)
        headers = {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(header_length),
        }
        return self._request("POST", "/infer", body, headers)

    def _ok(self, response: http1.Response) -> http1.Response:
        if response.status == 200:
            return response
        if response.status == 503:  # Triton's UNAVAILABLE: starting, stopping, or the model not ready
            raise Unavailable(_error_message(response))
        raise self.refused(_error_message(response))

    def _failure(self, e: BaseException) -> Exception | None:
        """What a failed exchange means to the caller; None for what is not the connection's doing."""
        if isinstance(e, TimeoutError):
            return self.no_answer()
        if isinstance(e, http1.ProtocolError):
            return RankingError(f"{self.url} did not answer in HTTP/1.1: {e}")
        if isinstance(e, OSError | http1.ConnectionClosed):
            return Unavailable(str(getattr(e, "strerror", None) or e))
        return None

    @staticmethod
    def _stale(e: BaseException, reused: bool, parser: http1.ResponseParser) -> bool:
        """A kept-alive connection the server had closed: it fails before the answer's first byte."""
        return reused and not parser.started and isinstance(e, OSError | http1.ConnectionClosed)

    def _inputs(self, response: http1.Response) -> list[tuple[str, list[int]]]:
        meta = _json(self._ok(response).body, f"the metadata of {self.model!r}")
        try:
            return [(t["name"], list(t["shape"])) for t in meta.get("inputs", [])]
        except (KeyError, TypeError):
            raise RankingError(
                f"the metadata of {self.model!r} lists an input without name or shape"
            ) from None

    def _ready(self, response: http1.Response) -> bool:
        if response.status == 503:
            raise Unavailable(_error_message(response))
        return response.status == 200


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


class HttpTransport(_Http):
    """Blocking; safe to share between threads (each exchange holds a connection of its own)."""

    def __init__(self, *args):
        super().__init__(*args)
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()

    def _connection(self, deadline: float) -> tuple[socket.socket, bool]:
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        sock = socket.create_connection((self.host, self.port), timeout=_left(deadline))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, False

    @staticmethod
    def _round_trip(sock: socket.socket, raw: bytes, parser: http1.ResponseParser, deadline: float):
        sock.settimeout(_left(deadline))
        sock.sendall(raw)
        while parser.response is None:
            sock.settimeout(_left(deadline))
            data = sock.recv(RECV_BYTES)
            if data:
                parser.feed(data)
            else:
                parser.feed_eof()
        return parser.response

    def _exchange(self, raw: bytes) -> http1.Response:
        deadline = time.monotonic() + self.timeout_s
        while True:
            parser, sock, reused = http1.ResponseParser(), None, False
            try:
                sock, reused = self._connection(deadline)
                response = self._round_trip(sock, raw, parser, deadline)
            except Exception as e:
                if sock is not None:
                    sock.close()
                if self._stale(e, reused, parser):
                    continue
                failure = self._failure(e)
                if failure is None:
                    raise
                raise failure from e
            if response.keep_alive:
                with self._lock:
                    self._idle.append(sock)
            else:
                sock.close()
            return response

    def ready(self) -> bool:
        return self._ready(self._exchange(self._request("GET", "/ready")))

    def inputs(self) -> list[tuple[str, list[int]]]:
        return self._inputs(self._exchange(self._request("GET")))

    def infer(self, tensors: Tensors, batched: bool) -> dict[str, np.ndarray]:
        return response_outputs(self._ok(self._exchange(self._infer_request(tensors, batched))), self.model)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()


class AsyncHttpTransport(_Http):
    """asyncio; concurrent calls each take a connection of their own from the pool."""

    def __init__(self, *args):
        super().__init__(*args)
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def _connection(self):
        if self._idle:
            return self._idle.pop(), True
        reader, writer = await asyncio.open_connection(self.host, self.port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return (reader, writer), False

    @staticmethod
    async def _round_trip(conn, raw: bytes, parser: http1.ResponseParser) -> http1.Response:
        reader, writer = conn
        writer.write(raw)
        await writer.drain()
        while parser.response is None:
            data = await reader.read(RECV_BYTES)
            if data:
                parser.feed(data)
            else:
                parser.feed_eof()
        return parser.response

    async def _attempt(self, raw: bytes) -> http1.Response:
        while True:
            parser, conn, reused = http1.ResponseParser(), None, False
            try:
                conn, reused = await self._connection()
                response = await self._round_trip(conn, raw, parser)
            except BaseException as e:  # a cancelled call leaves its connection half-used: close it too
                if conn is not None:
                    conn[1].close()
                if self._stale(e, reused, parser):
                    continue
                raise
            if response.keep_alive:
                self._idle.append(conn)
            else:
                conn[1].close()
            return response

    async def _exchange(self, raw: bytes) -> http1.Response:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._attempt(raw)
        except Exception as e:
            failure = self._failure(e)
            if failure is None:
                raise
            raise failure from e

    async def ready(self) -> bool:
        return self._ready(await self._exchange(self._request("GET", "/ready")))

    async def inputs(self) -> list[tuple[str, list[int]]]:
        return self._inputs(await self._exchange(self._request("GET")))

    async def infer(self, tensors: Tensors, batched: bool) -> dict[str, np.ndarray]:
        response = await self._exchange(self._infer_request(tensors, batched))
        return response_outputs(self._ok(response), self.model)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()
        for _, writer in idle:
            try:
                await writer.wait_closed()
            except OSError:
                pass
