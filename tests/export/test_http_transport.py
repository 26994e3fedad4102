"""The ranking client's HTTP transport: the request and answer layout of Triton's binary tensor extension,
a malformed answer named, and what it does when the connection misbehaves.

The answers here are checked against the real tritonserver in test_ranking_client.py (every server test
there runs over HTTP too). What a server seldom does on cue (close a kept-alive connection while it
idles, never answer, answer something other than HTTP, say it is unavailable) is played by a plain
socket peer on loopback.
"""

import asyncio
import json
import socket
import threading

import numpy as np
import pytest
from rank_answer import rank_answer

from clients import http1
from clients.http_transport import infer_body, response_outputs
from clients.rank_protocol import OUTPUTS, checked
from clients.ranking_client import AsyncRankingClient, ClientConfig, RankingClient, RankingError, endpoint

METADATA = json.dumps(
    {
        "name": "rank",
        "inputs": [
            {"name": n, "datatype": "INT64", "shape": [-1, -1]} for n in ("history_ids", "candidate_ids")
        ],
    }
).encode()


def _body(outputs: dict[str, tuple[str, np.ndarray]], as_json: tuple[str, ...] = ()) -> tuple[bytes, int]:
    """An infer answer's body as Triton writes it, `as_json` outputs in the JSON instead of binary."""
    header, blobs = {"model_name": "rank", "model_version": "7", "outputs": []}, []
    for name, (datatype, array) in outputs.items():
        out = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if name in as_json:
            out["data"] = array.ravel().tolist()
        else:
            out["parameters"] = {"binary_data_size": array.nbytes}
            blobs.append(array.tobytes())
        header["outputs"].append(out)
    head = json.dumps(header).encode()
    return head + b"".join(blobs), len(head)


def _response(body: bytes, header_length: int | None, status: int = 200) -> http1.Response:
    headers = {} if header_length is None else {"inference-header-content-length": str(header_length)}
    return http1.Response(status, "OK", headers, body, True)


def _http(status: int, body: bytes, header_length: int | None = None, close: bool = False) -> bytes:
    headers = {"Content-Type": "application/octet-stream"}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = str(header_length)
    if close:
        headers["Connection"] = "close"
    lines = [
        f"HTTP/1.1 {status} X",
        *(f"{k}: {v}" for k, v in headers.items()),
        f"Content-Length: {len(body)}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def test_the_request_body_is_a_json_header_then_the_raw_ids():
    tensors = checked([], [5, -2, 9], 4)
    body, header_length = infer_body(tensors, batched=True)
    header = json.loads(body[:header_length])
    assert [(t["name"], t["shape"], t["datatype"], t["parameters"]) for t in header["inputs"]] == [
        ("history_ids", [1, 1], "INT64", {"binary_data_size": 8}),
        ("candidate_ids", [1, 3], "INT64", {"binary_data_size": 24}),
        ("user_id", [1, 1], "INT64", {"binary_data_size": 8}),
    ]
    assert [o["name"] for o in header["outputs"]] == list(OUTPUTS)
    assert all(o["parameters"] == {"binary_data": True} for o in header["outputs"])
    assert np.frombuffer(body[header_length:], np.int64).tolist() == [0, 5, -2, 9, 4]
    flat, flat_length = infer_body(tensors, batched=False)
    assert [t["shape"] for t in json.loads(flat[:flat_length])["inputs"]] == [[1], [3], [1]]


@pytest.mark.parametrize("as_json", [(), ("user_known", "item_table_version")])
def test_answers_are_read_as_writable_arrays(as_json):
    out = response_outputs(_response(*_body(rank_answer(), as_json)), "rank")
    assert out["scores"].tolist() == [0, 1, 2] and out["item_table_version"].tolist() == [7]
    assert out["candidate_known"].dtype == bool and out["scores"].flags.writeable
    assert out["user_known"].tolist() == [False]


def test_an_output_rank_does_not_answer_is_skipped():
    answer = {"extra": ("FP32", np.ones(2, np.float32)), **rank_answer()}
    assert response_outputs(_response(*_body(answer)), "rank")["scores"].tolist() == [0, 1, 2]


def _malformed(kind: str) -> http1.Response:
    answer = rank_answer()
    if kind == "datatype":
        answer["scores"] = ("FP64", np.zeros((1, 3)))
    if kind == "missing":
        del answer["user_known"]
    body, header_length = _body(answer)
    if kind == "short":
        body = body[:-1]
    if kind == "trailing":
        body += b"\0"
    if kind == "header_length":
        header_length = len(body) + 1
    if kind == "bad_data":  # scores in the JSON, as text
        body, header_length = _body(answer, as_json=("scores",))
        head = body[:header_length].replace(b"[0.0, 1.0, 2.0]", b'["a", "b", "c"]')
        body, header_length = head + body[header_length:], len(head)
    if kind == "not_json":
        body, header_length = b"\xff" + body[1:], header_length
    return _response(body, header_length)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("datatype", "output 'scores' of 'rank' is FP64, expected FP32"),
        ("missing", r"has no \['user_known'\] output"),
        ("short", "claims 8 bytes past the body's end"),
        ("trailing", "carries 1 bytes past its outputs"),
        ("header_length", "Inference-Header-Content-Length"),
        ("not_json", "header of 'rank''s response is not JSON"),
        ("bad_data", "output 'scores' is not FP32 data"),
    ],
)
def test_a_malformed_answer_is_named(kind, message):
    with pytest.raises(RankingError, match=message):
        response_outputs(_malformed(kind), "rank")


@pytest.mark.parametrize(
    ("url", "want"),
    [
        ("127.0.0.1:8001", ("grpc", "127.0.0.1:8001", "", 0, "")),
        ("grpc://localhost:9001", ("grpc", "localhost:9001", "", 0, "")),
        ("http://127.0.0.1:8000", ("http", "127.0.0.1:8000", "127.0.0.1", 8000, "")),
        ("http://[::1]:8000/triton/", ("http", "[::1]:8000", "::1", 8000, "/triton")),
        ("http://ranker", ("http", "ranker", "ranker", 80, "")),
    ],
)
def test_the_url_picks_the_protocol(url, want):
    assert tuple(endpoint(url)) == want


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://127.0.0.1:8000", "TLS is not spoken here"),
        ("ftp://127.0.0.1:8000", "unknown scheme 'ftp'"),
        ("http://127.0.0.1:port", "Port could not be cast"),
        ("http://127.0.0.1:8000/?a=1", r"expected http://host:port\[/path\]"),
    ],
)
def test_a_bad_url_is_refused_at_once(url, message):
    with pytest.raises(RankingError, match=message):
        ClientConfig(url=url)


class Peer:
    """A loopback socket peer: `answer(request_head) -> bytes | None` per request (None: say nothing and
    hold the connection), and after `per_connection` answers it closes the connection without warning,
    as a server does with a kept-alive connection left idle."""

    def __init__(self, answer, per_connection: int = 1_000):
        self.answer, self.per_connection = answer, per_connection
        self.connections = self.requests = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket):
        with conn:
            buf = b""
            for _ in range(self.per_connection):
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = next(
                    (
                        int(h.split(b":")[1])
                        for h in head.split(b"\r\n")
                        if h.lower().startswith(b"content-length")
                    ),
                    0,
                )
                while len(buf) < length:
                    buf += conn.recv(65536)
                buf = buf[length:]
                self.requests += 1
                reply = self.answer(head.decode())
                if reply is None:
                    self._stop.wait(30)
                    return
                conn.sendall(reply)

    def close(self):
        self._stop.set()
        self._listener.close()


def rank_answers(head: str) -> bytes:
    """What Triton answers `rank`'s metadata and infer requests, for 3 candidates."""
    if head.startswith("GET"):
        return _http(200, METADATA)
    return _http(200, *_body(rank_answer(3)))


@pytest.fixture
def peer():
    peers = []

    def make(answer, per_connection: int = 1_000) -> Peer:
        peers.append(Peer(answer, per_connection))
        return peers[-1]

    yield make
    for p in peers:
        p.close()


def _sync_calls(url: str, calls: int, **cfg) -> list:
    with RankingClient(ClientConfig(url=url, **cfg)) as client:
        return [client.rank([1], [2, 3, 4]) for _ in range(calls)]


def _async_calls(url: str, calls: int, **cfg) -> list:
    async def run():
        async with AsyncRankingClient(ClientConfig(url=url, **cfg)) as client:
            return [await client.rank([1], [2, 3, 4]) for _ in range(calls)]

    return asyncio.run(run())


FLAVOURS = pytest.mark.parametrize("calls", [_sync_calls, _async_calls], ids=["sync", "asyncio"])


@FLAVOURS
def test_a_kept_alive_connection_the_server_closed_is_replaced_without_a_failed_call(peer, calls):
    p = peer(rank_answers, per_connection=1)  # every connection closes after one answer
    rankings = calls(p.url, 4, retries=0, timeout_s=5)
    assert [r.item_table_version for r in rankings] == [7] * 4
    assert p.requests == 5 and p.connections == 5  # the metadata, then 4 calls, each on a new connection


@FLAVOURS
def test_connections_are_kept_between_calls(peer, calls):
    p = peer(rank_answers)
    calls(p.url, 4, retries=0, timeout_s=5)
    assert p.requests == 5 and p.connections == 1


@FLAVOURS
def test_a_silent_server_is_a_timeout_naming_the_url(peer, calls):
    p = peer(lambda head: None)
    with pytest.raises(RankingError, match=rf"no answer from {p.url} within 0.3s"):
        calls(p.url, 1, retries=0, timeout_s=0.3)


@FLAVOURS
def test_an_answer_that_is_not_http_is_named(peer, calls):
    p = peer(lambda head: b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
    with pytest.raises(
        RankingError, match=rf"{p.url} did not answer in HTTP/1.1: not an HTTP/1.x status line"
    ):
        calls(p.url, 1, retries=0, timeout_s=5)


@FLAVOURS
def test_unavailable_is_retried_then_named_with_the_servers_words(peer, calls):
    p = peer(lambda head: _http(503, b'{"error":"Server is stopping"}'))
    with pytest.raises(RankingError, match=rf"Triton at {p.url} is unavailable .*: Server is stopping"):
        calls(p.url, 1, retries=2, backoff_s=0.01, timeout_s=5)
    assert p.requests == 3


@FLAVOURS
def test_an_error_answer_is_named_with_the_servers_words(peer, calls):
    p = peer(
        lambda head: _http(400, b'{"error":"Request for unknown model: \'rank\' is not found"}', close=True)
    )
    with pytest.raises(RankingError, match=rf"model 'rank' at {p.url}: Request for unknown model"):
        calls(p.url, 1, retries=3, timeout_s=5)
    assert p.requests == 1  # not retried
