"""HTTP/1.1 framing of the ranking client's HTTP transport: a response is the same whatever pieces the
connection hands it in, and a broken one is named."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clients.http1 import ConnectionClosed, ProtocolError, Response, ResponseParser, request

LENGTH = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\nhello world"
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nInference-Header-Content-Length: 5\r\n\r\n"
    b"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n"
)


def _parse(data: bytes, cuts: list[int], eof: bool = False) -> Response:
    parser = ResponseParser()
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    for start, end in zip(bounds, bounds[1:], strict=False):
        parser.feed(data[start:end])
    if eof:
        parser.feed_eof()
    assert parser.response is not None
    return parser.response


def test_a_request_is_one_buffer_with_its_length():
    raw = request("POST", "/v2/models/rank/infer", "127.0.0.1:8000", b"{}ab", {"X-Header": "1"})
    assert raw == (
        b"POST /v2/models/rank/infer HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nX-Header: 1\r\n"
        b"Content-Length: 4\r\n\r\n{}ab"
    )


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_a_length_framed_response_whatever_the_pieces(cuts):
    response = _parse(LENGTH, cuts)
    assert response == Response(
        200, "OK", {"content-type": "application/json", "content-length": "11"}, b"hello world", True
    )


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_a_chunked_response_whatever_the_pieces(cuts):
    response = _parse(CHUNKED, cuts)
    assert response.body == b"hello world" and response.keep_alive
    assert response.headers["inference-header-content-length"] == "5"


def test_a_response_framed_by_the_close_ends_there():
    raw = b"HTTP/1.1 200 OK\r\n\r\nall of it"
    response = _parse(raw, [20], eof=True)
    assert response.body == b"all of it" and not response.keep_alive


@pytest.mark.parametrize(
    ("raw", "keep_alive"),
    [
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.1 204 No Content\r\n\r\n", True),
    ],
)
def test_whether_the_connection_may_carry_the_next_request(raw, keep_alive):
    response = _parse(raw, [])
    assert response.body == b"" and response.keep_alive is keep_alive


def test_a_connection_closed_early_is_named_and_says_whether_a_byte_came():
    parser = ResponseParser()
    assert not parser.started
    with pytest.raises(ConnectionClosed, match="after 0 bytes"):
        parser.feed_eof()
    parser = ResponseParser()
    parser.feed(LENGTH[:-3])
    assert parser.started and parser.response is None
    with pytest.raises(ConnectionClosed, match=f"after {len(LENGTH) - 3} bytes"):
        parser.feed_eof()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", "malformed header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "Content-Length '-1' is not a byte count"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size line"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY", "does not end with CRLF"),
        (b"HTTP/1.1 200 OK\r\n" + b"X: " + b"y" * 70_000, "response head over"),
    ],
)
def test_a_malformed_response_is_named(raw, message):
    with pytest.raises(ProtocolError, match=message):
        ResponseParser().feed(raw)


def test_bytes_after_a_whole_response_are_refused():
    parser = ResponseParser()
    parser.feed(LENGTH)
    with pytest.raises(ProtocolError, match="after a whole response"):
        parser.feed(b"x")
