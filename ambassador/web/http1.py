"""A lean HTTP/1.1 server protocol for the proxy port.

twisted.web's Site, HTTPChannel, Request and resource traversal cost about a
third of a proxied request (docs/performance.md). The proxy needs much less:
one request at a time per connection, bodies held in memory, answers of known
length written in one piece. This protocol does that and keeps the limits of
``InboundLimits``: a problem+json refusal for every request it cannot take
(400, 408, 413, 414, 431; 503 beyond ``max_connections``), a read
deadline from a request's first byte to its last, an idle timeout between
requests, pipelining, ``Expect: 100-continue``, HEAD, keep-alive for
HTTP/1.1 and opt-in keep-alive for HTTP/1.0, flow control both ways, and
closing kept-alive connections for a shutdown (``close_connections``).

What a request means is the factory's business: ``serve(request)`` when one
has been read whole, ``gone(request)`` when its caller left before the answer.
"""

from __future__ import annotations

import re
from email.utils import formatdate
from http import HTTPStatus

from twisted.internet.protocol import Factory, Protocol

from ambassador.pipeline.chunked import BadChunks, BodyTooLarge, ChunkedBody, TrailerTooLong
from ambassador.web.limits import (
    InboundLimits,
    Overloaded,
    bad_request,
    body_too_large,
    headers_too_large,
    refuse_and_linger,
    target_too_long,
    too_slow,
)
from ambassador.logs import PerSecond
from ambassador.problems import Problem
from ambassador.sockets import send_now

# The blank line ending a head, found from its first LF (a literal start sre finds fast); a CR before it
# belongs to the blank line's match too, as in ``\r?\n\r?\n``.
_HEAD_END = re.compile(rb"\n\r?\n")
# A whole head once line ends are LF, checked in one match: method SP target SP version (RFC 9112 section 3,
# the target visible ASCII, checked further by the factory), then lines of token ":" value where no value
# holds a control character other than tab (so no bare CR either). Possessive, so that a refused head is
# read once, not backtracked through.
_HEAD = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) ([\x21-\x7e]+) (HTTP/1\.[01])"
                   rb"(?:\n[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\x00-\x08\x0a-\x1f\x7f]*+)*+\Z")
_STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}
_NO_BODY_STATUSES = frozenset({204, 304})


# Names as twisted.web wrote them (Header-Case, with its exceptions), remembered for the first
# thousand names: an upstream could invent endless ones.
_SPECIAL_CASE = {"Content-Md5": "Content-MD5", "Dnt": "DNT", "Etag": "ETag", "Te": "TE", "X-Request-Id": "X-Request-ID",
                 "Www-Authenticate": "WWW-Authenticate", "X-Xss-Protection": "X-XSS-Protection"}
_CANONICAL_NAMES: dict[str, str] = {}


def _canonical(name: str) -> str:
    found = "-".join(word.capitalize() for word in name.split("-"))
    found = _SPECIAL_CASE.get(found, found)
    if len(_CANONICAL_NAMES) < 1000:
        _CANONICAL_NAMES[name] = found
    return found


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


class _Refusal(Exception):
    def __init__(self, problem: Problem) -> None:
        self.problem = problem


class Request:
    """One request read whole. ``headers`` has lower-case names and each name's first value
    (``connection`` gathers all of them); the factory answers it once with ``respond``, and may
    keep its own notes about the request as further attributes (``web.ProxyFactory`` does)."""

    answered = False
    gone = False

    def __init__(self, connection: Connection, method: bytes, target: bytes, version: bytes, persistent: bool,
                 headers: dict[str, str], body: bytes, started: float) -> None:
        self.connection = connection
        self.method = method
        self.target = target
        self.version = version
        self.path, _, self.query = target.partition(b"?")
        self.persistent = persistent
        self.headers = headers
        self.body = body
        self.started = started

    def respond(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        """Send the answer; framing, Date and Connection headers are added."""
        if not self.answered and not self.gone:
            self.answered = True
            self.connection.send_answer(self, status, headers, body)


class Connection(Protocol):
    """One caller's connection: reads requests one at a time and hands each to the factory."""

    def __init__(self, factory: HTTP1Factory) -> None:
        self.factory = factory
        self.limits = factory.limits
        self._clock = factory.clock
        self._buffer = b""
        self._scanned = 0  # how far the buffer is known to hold no head end
        self._began: float | None = None  # when the first byte of the request being read arrived
        self._head = None  # (method, target, version, persistent, headers) once the head is read
        self._body_length = 0
        self._chunked: ChunkedBody | None = None
        self._current: Request | None = None  # read whole, not answered yet
        self._deadline = None  # the read deadline, or after a refusal the lingering limit
        self._idle = None
        self._quiet_since = 0.0
        self._reading_done = False
        self._write_blocked = False
        self._reading_paused = False
        self._parsing = False
        self._continue = False  # the caller waits for 100 Continue before sending the body

    # -- the connection's life

    def connectionMade(self) -> None:
        self.factory.connections.add(self)
        self.transport.registerProducer(self, True)
        self._quiet_since = self._clock.seconds()
        self._idle = self._clock.callLater(self.limits.idle_timeout, self._idle_check)

    def connectionLost(self, reason) -> None:
        self.factory.connections.discard(self)
        for call in (self._deadline, self._idle):
            if call is not None and call.active():
                call.cancel()
        current, self._current = self._current, None
        if current is not None:
            current.gone = True
            self.factory.gone(current)

    def close_when_idle(self) -> None:
        if self._current is None and self._began is None:
            self._reading_done = True
            self.transport.loseConnection()

    def _idle_check(self) -> None:
        now = self._clock.seconds()
        due = self._quiet_since + self.limits.idle_timeout
        if self._current is not None or self._began is not None or now < due:
            # busy (a request being read is bounded by the read deadline instead), or not quiet long enough
            self._idle = self._clock.callLater(max(due - now, 0) or self.limits.idle_timeout, self._idle_check)
        else:
            self._idle = None
            self.transport.loseConnection()

    # -- flow control: the transport pauses us when the caller does not read its answers

    def pauseProducing(self) -> None:
        self._write_blocked = True

    def resumeProducing(self) -> None:
        self._write_blocked = False
        if self._current is None:
            self._read_on()

    def stopProducing(self) -> None:
        pass  # connectionLost follows

    def _pause_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()

    def _read_on(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()
        self._parse()

    # -- reading

    def dataReceived(self, data: bytes) -> None:
        if self._reading_done:
            return  # closing, or lingering after a refusal: read and drop
        self._buffer = self._buffer + data if self._buffer else data
        if self._current is None and not self._write_blocked:
            self._parse()
        elif len(self._buffer) > self.limits.max_header_bytes + self.limits.max_body:
            self._pause_reading()  # pipelined requests wait for the one being answered

    def _parse(self) -> None:
        if self._parsing:
            return  # an answer given during serve(): the loop below goes on with the next request
        self._parsing = True
        try:
            while self._buffer and self._current is None and not self._write_blocked and not self._reading_done:
                if self._began is None:
                    self._buffer = self._buffer.lstrip(b"\r\n")  # empty lines before a request are ignored
                    if not self._buffer:
                        return
                    self._began = self._clock.seconds()
                request = self._read_request()
                if request is None:
                    if self._deadline is None:
                        self._deadline = self._clock.callLater(
                            max(self._began + self.limits.read_timeout - self._clock.seconds(), 0), self._too_slow)
                    return
                self._stop_deadline()
                self._began = None
                self._current = request
                self.factory.serve(request)
        except _Refusal as refusal:
            self.refuse(refusal.problem)
        finally:
            self._parsing = False

    def _read_request(self) -> Request | None:
        if self._head is None:
            match = _HEAD_END.search(self._buffer, self._scanned)
            if match is None:
                self._check_partial_head()
                self._scanned = max(len(self._buffer) - 3, 0)
                return None
            start = match.start()
            if start > self._scanned and self._buffer[start - 1] == 13:  # CR LF [CR] LF
                start -= 1
            self._scanned = 0
            head, self._buffer = self._buffer[:start], self._buffer[match.end():]
            self._head = self._read_head(head)
        if self._chunked is not None:
            try:
                body, self._buffer = self._chunked.feed(self._buffer)
            except BadChunks:
                raise _Refusal(bad_request())
            except BodyTooLarge:
                raise _Refusal(body_too_large(self.limits))
            except TrailerTooLong:
                raise _Refusal(headers_too_large(self.limits))
            if body is not None:
                self._chunked = None
        elif len(self._buffer) >= self._body_length:
            body, self._buffer = self._buffer[:self._body_length], self._buffer[self._body_length:]
        else:
            body = None
        if body is None:
            if self._continue:
                self._continue = False
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            return None
        (method, target, version, persistent, headers), self._head = self._head, None
        return Request(self, method, target, version, persistent, headers, body, self._began)

    def _check_partial_head(self) -> None:
        buffer, limits = self._buffer, self.limits
        first_end = buffer.find(b"\n")
        if (first_end if first_end >= 0 else len(buffer)) > limits.max_line:
            raise _Refusal(target_too_long(limits))
        if len(buffer) > limits.max_header_bytes or len(buffer) - buffer.rfind(b"\n") - 1 > limits.max_line:
            raise _Refusal(headers_too_large(limits))

    def _read_head(self, head: bytes):
        limits = self.limits
        head = head.replace(b"\r\n", b"\n")
        lines = head.decode("latin-1").split("\n")  # one decoding: latin-1 maps each byte to one character
        if len(lines[0]) > limits.max_line:
            raise _Refusal(target_too_long(limits))
        if len(head) > limits.max_header_bytes or len(lines) - 1 > limits.max_headers or (
                len(head) > limits.max_line and max(map(len, lines)) > limits.max_line):  # no line outgrows the head
            raise _Refusal(headers_too_large(limits))
        checked = _HEAD.match(head)
        if checked is None:
            raise _Refusal(bad_request())
        method, target, version = checked.groups()
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            key = name.lower()
            if key not in headers:
                headers[key] = value.strip(" \t")
            elif key == "connection":
                headers[key] += ", " + value.strip(" \t")
            elif key in ("content-length", "transfer-encoding", "host"):
                raise _Refusal(bad_request())  # two framings, two hosts: a smuggling attempt
        self._framing(headers, version)
        connection = headers.get("connection")
        if connection is None:
            persistent = version == b"HTTP/1.1"
        else:
            tokens = {t.strip().lower() for t in connection.split(",")}
            persistent = "close" not in tokens if version == b"HTTP/1.1" else "keep-alive" in tokens
        self._continue = version == b"HTTP/1.1" and headers.get("expect", "").lower() == "100-continue"
        return method, target, version, persistent, headers

    def _framing(self, headers: dict[str, str], version: bytes) -> None:
        length, coding = headers.get("content-length"), headers.get("transfer-encoding")
        self._body_length, self._chunked = 0, None
        if coding is not None:
            if length is not None or version != b"HTTP/1.1" or coding.lower() != "chunked":
                raise _Refusal(bad_request())
            self._chunked = ChunkedBody(self.limits.max_body, self.limits.max_line)
        elif length is not None:
            if not length.isdigit() or not length.isascii():
                raise _Refusal(bad_request())
            if len(length) > 18 or int(length) > self.limits.max_body:
                raise _Refusal(body_too_large(self.limits))
            self._body_length = int(length)

    def _too_slow(self) -> None:
        self._deadline = None
        self.refuse(too_slow(self.limits))

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    # -- answering

    def send_answer(self, request: Request, status: int, headers, body: bytes) -> None:
        lines = [_STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status]
        known = _CANONICAL_NAMES
        text = [f"{known.get(name) or _canonical(name)}: {value}\r\n" for name, value in headers]
        joined = "".join(text)
        if joined.count("\n") != len(text) or joined.count("\r") != len(text):  # a line end in a name or value
            text = [f"{_one_line(name)}: {_one_line(value)}\r\n" for name, value in headers]  # no header injection
        if "\ndate:" not in f"\n{joined}".lower():
            text.append(self.factory.date_header())
        if status not in _NO_BODY_STATUSES and status >= 200:
            text.append(f"Content-Length: {len(body)}\r\n")
        if self.factory.closing:
            request.persistent = False
        if not request.persistent:
            text.append("Connection: close\r\n\r\n")
        else:
            text.append("Connection: keep-alive\r\n\r\n" if request.version == b"HTTP/1.0" else "\r\n")
        head = "".join(text)
        try:
            lines.append(head.encode("latin-1"))
        except UnicodeEncodeError:
            lines.append(head.encode("utf-8"))
        if request.method != b"HEAD" and status not in _NO_BODY_STATUSES:
            lines.append(body)
        send_now(self.transport, b"".join(lines))
        self._current = None
        if not request.persistent:
            self._reading_done = True
            self.transport.loseConnection()
            return
        self._quiet_since = self._clock.seconds()
        if self._buffer or self._reading_paused:
            self._read_on()  # pipelined requests

    def refuse(self, problem: Problem) -> None:
        """Answer ``problem`` and close, dropping whatever else the caller sends (``refuse_and_linger``)."""
        if self._reading_done:
            return
        self._reading_done = True
        self._buffer = b""
        self._stop_deadline()
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()
        self._deadline = refuse_and_linger(self.transport, problem, self.factory.refused, self.limits.read_timeout,
                                           self._clock.callLater)


class HTTP1Factory(Factory):
    """Connections that keep to ``limits``, timed by ``clock``; subclasses say what a request means."""

    noisy = False

    def __init__(self, clock, limits: InboundLimits = InboundLimits()) -> None:
        self.clock = clock
        self.limits = limits
        self.connections: set[Connection] = set()
        self.closing = False  # shutting down: answer what is asked with Connection: close
        self._date = PerSecond(lambda second: f"Date: {formatdate(second, usegmt=True)}\r\n")

    def buildProtocol(self, addr):
        if len(self.connections) >= self.limits.max_connections:
            return Overloaded(self)
        return Connection(self)

    def close_connections(self) -> None:
        """For a shutdown: idle connections close now, the others after their answer."""
        self.closing = True
        for connection in list(self.connections):
            connection.close_when_idle()

    def date_header(self) -> str:
        """``Date: ...`` for now, formatted once a second."""
        return self._date.at(self.clock.seconds())

    def serve(self, request: Request) -> None:
        raise NotImplementedError

    def gone(self, request: Request) -> None:
        """The caller of ``request`` left before it was answered."""

    def refused(self, problem: Problem, request_id: str) -> None:
        """A problem was answered before a request was read whole."""
