"""Decoding a chunked message body (RFC 9112 section 7.1) as its bytes arrive.

Used for request bodies on the proxy port (``ambassador.web.http1``); upstream answers are read
through treq. Trailer fields are read and dropped. Line ends may be CRLF or a bare LF, which
RFC 9112 lets a recipient accept.
"""

from __future__ import annotations

import re

_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\r\n]*)?\r?\n")
MAX_SIZE_LINE = 1024


class BadChunks(ValueError):
    """The body is not valid chunked coding."""


class BodyTooLarge(Exception):
    """The chunks add up to more than the limit."""


class TrailerTooLong(Exception):
    """A trailer line is longer than allowed."""


class ChunkedBody:
    """One body: ``feed`` it what arrives until it gives the whole body."""

    def __init__(self, limit: int, max_trailer_line: int) -> None:
        self._limit = limit
        self._max_trailer_line = max_trailer_line
        self._parts: list[bytes] = []
        self._size = 0
        self._left = 0  # data bytes of the current chunk still to come
        self._state = "size"  # size, data, data-end, trailers

    def feed(self, data: bytes) -> tuple[bytes | None, bytes]:
        """(the whole body, or None while incomplete; what is left unread: after the body, or a
        partial line to be fed again with what follows)."""
        at = 0
        while True:
            if self._state == "size":
                match = _SIZE_LINE.match(data, at)
                if match is None:
                    if b"\n" in data[at:at + MAX_SIZE_LINE] or len(data) - at > MAX_SIZE_LINE:
                        raise BadChunks("bad chunk size line")
                    return None, data[at:]
                self._left, at = int(match.group(1), 16), match.end()
                if self._size + self._left > self._limit:
                    raise BodyTooLarge(self._limit)
                self._state = "data" if self._left else "trailers"
            elif self._state == "data":
                piece = data[at:at + self._left]
                self._parts.append(piece)
                self._size += len(piece)
                self._left -= len(piece)
                at += len(piece)
                if self._left:
                    return None, b""
                self._state = "data-end"
            elif self._state == "data-end":
                if data.startswith(b"\r\n", at):
                    at += 2
                elif data.startswith(b"\n", at):
                    at += 1
                elif data[at:] in (b"", b"\r"):
                    return None, data[at:]
                else:
                    raise BadChunks("chunk not ended by a line end")
                self._state = "size"
            else:  # trailers: lines up to an empty one
                end = data.find(b"\n", at)
                if (end if end >= 0 else len(data)) - at > self._max_trailer_line + 1:  # the line and its CR
                    raise TrailerTooLong(self._max_trailer_line)
                if end < 0:
                    return None, data[at:]
                line, at = data[at:end].rstrip(b"\r"), end + 1
                if not line:
                    return b"".join(self._parts), data[at:]
