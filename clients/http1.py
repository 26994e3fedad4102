"""HTTP/1.1 framing without I/O: `request()` encodes one request, `ResponseParser` reads one response from
whatever bytes the connection hands it (a socket's `recv` or an asyncio stream's `read`), so the blocking
and the asyncio transports share one parser.

The client keeps connections open between calls (HTTP/1.1 keep-alive) and sends each request in one
write. A response is framed by Content-Length, by chunked transfer encoding (what a proxy in front of
Triton may send) or, without either, by the server closing the connection.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_HEAD = 64 * 1024  # status line and headers; Triton's are a few hundred bytes
_CRLF, _END_OF_HEAD = b"\r\n", b"\r\n\r\n"
_TRAILERS = -1  # chunked: the zero-size chunk came, trailers follow


class ProtocolError(Exception):
    """The peer's bytes are not an HTTP/1.1 response."""


class ConnectionClosed(Exception):
    """The connection closed before the response was whole."""


@dataclass(frozen=True)
class Response:
    status: int
    reason: str
    headers: dict[str, str]  # names lower-cased; a repeated header keeps its last value
    body: bytes
    keep_alive: bool  # the connection may carry the next request


def request(
    method: str, target: str, host: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    """One request as bytes; Content-Length always, so the server never waits for a close."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _head(block: bytes) -> tuple[int, str, str, dict[str, str]]:
    status_line, *header_lines = block.decode("latin-1").split("\r\n")
    version, _, rest = status_line.partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or not (len(code) == 3 and code.isdigit()):
        raise ProtocolError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
    headers = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ProtocolError(f"malformed header line: {line[:80]!r}")
        headers[name.lower()] = value.strip()
    return int(code), reason, version, headers


class ResponseParser:
    """Feed it bytes until `response` is set. `started` says whether any byte arrived: a kept-alive
    connection the server had closed fails before the first one, and the request may go again on a new
    connection."""

    def __init__(self):
        self._buf = bytearray()
        self._pos = 0  # parsed up to here
        self._head: tuple[int, str, str, dict[str, str]] | None = None
        self._length: int | None = None  # bytes of body still expected when framed by Content-Length
        self._chunked = False
        self._until_close = False
        self._chunk_left: int | None = None  # chunked: data bytes left in this chunk, or _TRAILERS
        self._body = bytearray()
        self.response: Response | None = None

    @property
    def started(self) -> bool:
        return bool(self._buf) or self._head is not None

    def feed(self, data: bytes) -> None:
        if not data:  # nothing arrived; the end of the stream is feed_eof's to say
            return
        if self.response is not None:
            raise ProtocolError(f"{len(data)} bytes after a whole response")
        self._buf += data
        if self._head is None and not self._read_head():
            return
        if self._chunked:
            self._read_chunks()
        elif self._until_close:
            self._take(len(self._buf) - self._pos)
        else:
            self._read_length()

    def feed_eof(self) -> None:
        if self.response is not None:
            return
        if self._head is not None and self._until_close:
            self._finish(keep_alive=False)
            return
        received = len(self._buf)
        raise ConnectionClosed(f"the connection closed after {received} bytes of the response")

    def _read_head(self) -> bool:
        end = self._buf.find(_END_OF_HEAD)
        if end < 0:
            if len(self._buf) > MAX_HEAD:
                raise ProtocolError(f"response head over {MAX_HEAD} bytes")
            return False
        self._head = _head(bytes(self._buf[:end]))
        self._pos = end + len(_END_OF_HEAD)
        status, headers = self._head[0], self._head[3]
        if status in (204, 304) or 100 <= status < 200:
            self._length = 0
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._chunked = True
        elif "content-length" in headers:
            text = headers["content-length"]
            if not text.isdigit():
                raise ProtocolError(f"Content-Length {text!r} is not a byte count")
            self._length = int(text)
        else:
            self._until_close = True
        return True

    def _take(self, n: int) -> None:
        self._body += self._buf[self._pos : self._pos + n]
        self._pos += n

    def _read_length(self) -> None:
        n = min(self._length, len(self._buf) - self._pos)
        self._take(n)
        self._length -= n
        if self._length == 0:
            self._finish(keep_alive=True)

    def _read_chunks(self) -> None:
        while True:
            if self._chunk_left is None:  # at a size line
                end = self._buf.find(_CRLF, self._pos)
                if end < 0:
                    if len(self._buf) - self._pos > MAX_HEAD:
                        raise ProtocolError(f"chunk size line over {MAX_HEAD} bytes")
                    return
                line = bytes(self._buf[self._pos : end]).split(b";")[0].strip()
                if not line or any(c not in b"0123456789abcdefABCDEF" for c in line):
                    raise ProtocolError(f"bad chunk size line: {line[:40]!r}")
                self._pos = end + len(_CRLF)
                self._chunk_left = int(line, 16) or _TRAILERS
            if self._chunk_left == _TRAILERS:  # after the last chunk: trailer lines, then an empty line
                if (
                    self._buf[self._pos : self._pos + 2] == _CRLF
                    or self._buf.find(_END_OF_HEAD, self._pos) >= 0
                ):
                    self._finish(keep_alive=True)
                return
            n = min(self._chunk_left, len(self._buf) - self._pos)
            self._take(n)
            self._chunk_left -= n
            if self._chunk_left > 0 or len(self._buf) - self._pos < len(_CRLF):
                return
            if self._buf[self._pos : self._pos + 2] != _CRLF:
                raise ProtocolError("a chunk does not end with CRLF")
            self._pos += len(_CRLF)
            self._chunk_left = None

    def _finish(self, keep_alive: bool) -> None:
        status, reason, version, headers = self._head
        connection = headers.get("connection", "").lower()
        keep_alive = keep_alive and version == "HTTP/1.1" and "close" not in connection
        self.response = Response(status, reason, headers, bytes(self._body), keep_alive)
