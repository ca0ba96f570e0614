"""HTTP/1.1 on the wire, as little as the load generator needs; no I/O here.

Only what hypercorn sends is understood: a status line, headers, and a body
framed by ``Content-Length`` (RFC 9112 §6.3).  A chunked or unframed answer is
a :class:`ProtocolError`, counted as an error by the load generator rather than
guessed at.
"""

from __future__ import annotations

from dataclasses import dataclass

HEAD_END = b"\r\n\r\n"
MAX_HEAD_BYTES = 64 * 1024


class ProtocolError(Exception):
    """The server's bytes are not an HTTP/1.1 response this client understands."""


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    content_length: int
    head_length: int  # bytes up to and including the blank line


def request_bytes(path: str, host: str) -> bytes:
    """A keep-alive GET for ``path`` (already percent-encoded)."""
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: bbb-bench\r\n\r\n".encode("ascii")


def parse_head(buffer: bytes | bytearray) -> ResponseHead | None:
    """The response head at the start of ``buffer``, or None while it is incomplete.

    Error handling: :class:`ProtocolError` for a malformed status line, a head
    over ``MAX_HEAD_BYTES``, or a body not framed by ``Content-Length``.
    """
    end = buffer.find(HEAD_END)
    if end < 0:
        if len(buffer) > MAX_HEAD_BYTES:
            raise ProtocolError("response head too long")
        return None
    lines = bytes(buffer[:end]).split(b"\r\n")
    return ResponseHead(_status(lines[0]), _content_length(lines[1:]), end + len(HEAD_END))


def _status(line: bytes) -> int:
    # status-line = HTTP-version SP status-code SP [ reason-phrase ]  (RFC 9112 §4)
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError(f"bad status line {line[:80]!r}")
    return int(parts[1])


def _content_length(header_lines: list[bytes]) -> int:
    for line in header_lines:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            if not value.strip().isdigit():
                raise ProtocolError(f"bad Content-Length {value[:40]!r}")
            return int(value)
    raise ProtocolError("no Content-Length (chunked or close-delimited bodies are not supported)")
