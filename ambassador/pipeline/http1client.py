"""A lean HTTP/1.1 client for the proxy's hot path: GET and HEAD without a body, kept-alive connections.

treq over Twisted's ``Agent`` spends most of the proxy's time on things the
hot path does not need: URL objects and IDNA checks per request, a cookie
agent, a content-decoder agent, ``Headers`` objects, a body-producer and a
consumer protocol, several Deferred layers. This client writes one
pre-formatted request and parses the answer straight into an
``UpstreamResponse``. ``UpstreamClient`` uses it for GET and HEAD without a
body (what the adapters send on every request) and keeps treq for the rest
(OAuth2 token requests, bodies).

It keeps what the treq path guaranteed:

- no redirects (nothing is followed: a 3xx is an answer like any other) and no cookies (none
  are stored or sent);
- the body is read up to ``max_body`` bytes; past that the connection is dropped and the
  request fails with ``ResponseTooLarge``;
- Content-Length, chunked and close-delimited bodies; a malformed answer (bad status line,
  header, length or chunk) fails with ``ResponseFailed``, like treq;
- cancelling the Deferred drops the connection (that is how the attempt timeout works);
- https is verified like ``Agent`` does (``BrowserLikePolicyForHTTPS``: system trust store,
  host name checked);
- connection failures come back as Twisted's own exceptions (``ConnectError`` …,
  ``ResponseNeverReceived``, ``ResponseFailed`` wrapping the reason), which
  ``Gateway._explain_failure`` maps to problems;
- a request sent on a pooled connection the upstream had closed meanwhile (nothing of an
  answer arrived) is sent once more on a new connection, as Twisted's pool does for
  idempotent requests.
"""

from __future__ import annotations

import re
from urllib.parse import quote, urlencode, urlsplit

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web.client import BrowserLikePolicyForHTTPS, ResponseFailed, ResponseNeverReceived

from ambassador.pipeline.chunked import BadChunks, BodyTooLarge, ChunkedBody, TrailerTooLong
from ambassador.exchange import UpstreamRequest, UpstreamResponse
from ambassador.sockets import send_now

#: Request methods the lean client sends (idempotent, never with a body here).
LEAN_METHODS = frozenset({"GET", "HEAD"})
#: The most the status line and headers of an answer may take.
MAX_HEAD_BYTES = 65536
#: How many request heads a pool keeps ready to send again (the hot URLs).
HEADS_KEPT = 256

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_DIGITS = re.compile(r"[0-9]+\Z")
_STATUS = re.compile(r"HTTP/1\.([01]) ([1-9][0-9][0-9])(?= |\r\n|\Z)")
# A header line: its name, and its value after the spaces and tabs that open it.
_HEADER_LINE = re.compile(r"\r\n([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\r]*)")
# What may stand in a request target unquoted (RFC 3986 pchar, "/" and "?" for the query).
_PLAIN_TARGET = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*\Z")
_LINE_BREAKS = str.maketrans({"\r": " ", "\n": " ", "\0": " "})


class ResponseTooLarge(Exception):
    """The upstream answer was longer than its adapter's limit; the rest was not read."""


class BadResponse(Exception):
    """The upstream's answer was not HTTP/1.1 the client could read."""


class Origin:
    """Where requests go: scheme, host and port, with what is needed to connect and to say Host."""

    __slots__ = ("scheme", "host", "port", "host_header", "key")

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.scheme = parts.scheme
        self.host = parts.hostname
        default = 443 if self.scheme == "https" else 80
        self.port = parts.port or default
        host = self.host.encode("idna").decode("ascii") if not self.host.isascii() else self.host
        if ":" in host:
            host = f"[{host}]"
        self.host_header = host if self.port == default else f"{host}:{self.port}"
        self.key = (self.scheme, self.host, self.port)


def request_head(origin: Origin, request: UpstreamRequest, user_agent: str) -> bytes:
    """The request line and headers of ``request`` for ``origin``, ready to write."""
    target = request.path or "/"
    if not _PLAIN_TARGET.match(target):
        target = quote(target, safe="/:@!$&'()*+,;=-._~%")
    if request.query:
        target += "?" + urlencode(request.query)
    lines = [f"{request.method} {target} HTTP/1.1"]
    given = set()
    for name, value in request.headers.items():
        if not _TOKEN.match(name):
            raise ValueError(f"invalid header name {name!r}")
        given.add(name.lower())
        lines.append(f"{name}: {value.translate(_LINE_BREAKS)}")
    if "host" not in given:
        lines.insert(1, f"Host: {origin.host_header}")
    if "user-agent" not in given:
        lines.append(f"User-Agent: {user_agent}")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("utf-8")


class _Exchange:
    """One request on its way: connecting, sent on a connection, or finished."""

    __slots__ = ("pool", "origin", "head", "head_only", "limit", "deferred", "connecting", "connection", "reused")

    def __init__(self, pool: ConnectionPool, origin: Origin, head: bytes, head_only: bool, limit: int) -> None:
        self.pool, self.origin, self.head, self.head_only, self.limit = pool, origin, head, head_only, limit
        self.deferred = defer.Deferred(self._cancel)
        self.connecting = None
        self.connection = None
        self.reused = False

    def start(self) -> None:
        connection = self.pool._take(self.origin)
        if connection is None:
            self._connect()
        else:
            self.reused = True
            connection.send(self)

    def _connect(self) -> None:
        self.reused = False
        self.connecting = self.pool._endpoint(self.origin).connect(_ConnectionFactory(self.pool, self.origin))
        self.connecting.addCallbacks(self._connected, self._not_connected)

    def _connected(self, connection: _Connection) -> None:
        self.connecting = None
        connection.send(self)

    def _not_connected(self, failure: Failure) -> None:
        if self.connecting is None:  # cancelled
            return
        self.connecting = None
        self.deferred.errback(failure)

    def _cancel(self, _) -> None:
        connecting, connection = self.connecting, self.connection
        self.connecting = self.connection = None
        if connecting is not None:
            connecting.cancel()
        if connection is not None:
            connection.abandon()

    def answered(self, response: UpstreamResponse) -> None:
        self.connection = None
        self.deferred.callback(response)

    def failed(self, failure: Failure, never_answered: bool = False) -> None:
        if self.connection is None:  # cancelled: the Deferred has its CancelledError
            return
        self.connection = None
        if never_answered and self.reused:
            self._connect()  # the pooled connection was stale: once more on a new one
        else:
            self.deferred.errback(failure)


_HEAD, _LENGTH, _CHUNKED, _UNTIL_CLOSE = range(4)


class _Connection(Protocol):
    """One kept-alive connection to an origin: sends one request at a time and reads its answer."""

    def __init__(self, pool: ConnectionPool, origin: Origin) -> None:
        self._pool = pool
        self.origin = origin
        self.exchange: _Exchange | None = None
        self.idle_since = 0.0
        self._state = _HEAD
        self._buffer = b""
        self._received = False
        self._chunked: ChunkedBody | None = None

    def send(self, exchange: _Exchange) -> None:
        self.exchange = exchange
        exchange.connection = self
        self._state, self._buffer, self._received = _HEAD, b"", False
        send_now(self.transport, exchange.head)

    def abandon(self) -> None:
        self.exchange = None
        self.transport.abortConnection()

    # Parsing. Each state consumes what it can of ``data`` and hands the rest on.

    def dataReceived(self, data: bytes) -> None:
        if self.exchange is None:
            self.transport.abortConnection()  # nothing was asked: an upstream speaking out of turn
            return
        self._received = True
        if self._buffer:
            data, self._buffer = self._buffer + data, b""
        try:
            while data and self.exchange is not None:
                data = self._parsers[self._state](self, data)
        except BadResponse as e:
            self._fail(Failure(ResponseFailed([Failure(e)])))
        except ResponseTooLarge as e:
            self._fail(Failure(e))

    def _parse_head(self, data: bytes) -> bytes:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if len(data) > MAX_HEAD_BYTES:
                raise BadResponse("status line and headers too long")
            if b"\n\n" in data:
                raise BadResponse("header lines not ended by CRLF")
            self._buffer = data
            return b""
        if end > MAX_HEAD_BYTES:
            raise BadResponse("status line and headers too long")
        head = data[:end].decode("latin-1")  # once: latin-1 maps each byte to one character
        status = _STATUS.match(head)
        if status is None:
            raise BadResponse("bad status line")
        code = int(status.group(2))
        fields = _HEADER_LINE.findall(head, status.end())
        # Every CR and LF must be the CRLF that opens one of these lines: then each line is a name, a colon
        # and a value, and there is no bare CR or LF (RFC 9112 §2.2). (One regex call: they cost.)
        if head.count("\r") != len(fields) or head.count("\n") != len(fields) or "\0" in head:
            raise BadResponse("bad header line or value")
        headers = {name.lower(): value.rstrip(" \t") for name, value in fields}
        if len(headers) < len(fields):  # a name more than once: its values joined, in order
            headers = {}
            for name, value in fields:
                name, value = name.lower(), value.rstrip(" \t")
                headers[name] = headers[name] + ", " + value if name in headers else value
        rest = data[end + 4:]
        if code < 200:
            if code == 101:
                raise BadResponse("an upgrade nobody asked for")
            return rest  # an interim answer (100 Continue, 103 Early Hints): the real one follows
        self._code, self._headers = code, headers
        self._reusable = status.group(1) == "1" and "close" not in headers.get("connection", "").lower()
        self._chunks, self._size = [], 0
        limit = self.exchange.limit
        encoding, length = headers.get("transfer-encoding"), headers.get("content-length")
        if self.exchange.head_only or code in (204, 304):
            self._finish(b"", leftover=rest)
            return b""
        if encoding is not None:
            if length is not None:
                self._reusable = False  # both framings: read as chunked, never reuse (RFC 9112 §6.3)
            if encoding.rsplit(",", 1)[-1].strip().lower() == "chunked":
                self._state, self._chunked = _CHUNKED, ChunkedBody(limit, MAX_HEAD_BYTES)
            else:
                self._state, self._reusable = _UNTIL_CLOSE, False
            return rest
        if length is None:
            self._state, self._reusable = _UNTIL_CLOSE, False
            return rest
        if not (length.isdigit() and length.isascii()):  # "2, 2": one length said twice is that length
            values = {v.strip() for v in length.split(",")}
            if len(values) != 1:
                raise BadResponse("conflicting Content-Length")
            (length,) = values
            if not _DIGITS.match(length):
                raise BadResponse("bad Content-Length")
        self._left = int(length)
        if self._left > limit:
            raise ResponseTooLarge(limit)
        if len(rest) >= self._left:  # the usual case: the whole body arrived with the head
            body, rest = rest[:self._left], rest[self._left:]
            self._finish(body, leftover=rest)
            return b""
        self._state = _LENGTH
        return rest

    def _parse_length(self, data: bytes) -> bytes:
        part, rest = data[:self._left], data[self._left:]
        self._chunks.append(part)
        self._left -= len(part)
        if self._left == 0:
            self._finish(b"".join(self._chunks), leftover=rest)
        return b""

    def _parse_chunked(self, data: bytes) -> bytes:
        try:
            body, rest = self._chunked.feed(data)
        except BadChunks as e:
            raise BadResponse(str(e))
        except TrailerTooLong:
            raise BadResponse("trailers too long")
        except BodyTooLarge:
            raise ResponseTooLarge(self.exchange.limit)
        if body is None:
            self._buffer = rest
        else:
            self._finish(body, leftover=rest)
        return b""

    def _parse_until_close(self, data: bytes) -> bytes:
        self._size += len(data)
        if self._size > self.exchange.limit:
            raise ResponseTooLarge(self.exchange.limit)
        self._chunks.append(data)
        return b""

    _parsers = {_HEAD: _parse_head, _LENGTH: _parse_length, _CHUNKED: _parse_chunked, _UNTIL_CLOSE: _parse_until_close}

    def _finish(self, body: bytes, leftover: bytes = b"") -> None:
        exchange, self.exchange = self.exchange, None
        self._state, self._chunks, self._chunked = _HEAD, None, None
        if self._reusable and not leftover:
            self._pool._put(self)
        else:
            self.transport.loseConnection()
        exchange.answered(UpstreamResponse(status=self._code, headers=self._headers, body=body))

    def _fail(self, failure: Failure) -> None:
        exchange, self.exchange = self.exchange, None
        self.transport.abortConnection()
        exchange.failed(failure)

    def connectionLost(self, reason: Failure) -> None:
        self._pool._forget(self)
        exchange, self.exchange = self.exchange, None
        if exchange is None:
            return
        if self._state == _UNTIL_CLOSE:
            self.exchange = exchange
            self._reusable = False
            self._finish(b"".join(self._chunks))
        elif not self._received:
            exchange.failed(Failure(ResponseNeverReceived([reason])), never_answered=True)
        else:
            exchange.failed(Failure(ResponseFailed([reason])))


class _ConnectionFactory(Factory):
    noisy = False  # Twisted would log "Starting factory" for every upstream connection

    def __init__(self, pool: ConnectionPool, origin: Origin) -> None:
        self._pool, self._origin = pool, origin

    def buildProtocol(self, addr) -> _Connection:
        return _Connection(self._pool, self._origin)


class ConnectionPool:
    """Kept-alive connections per origin: at most ``max_idle_per_origin`` idle ones each, an idle one
    closed after ``idle_timeout`` seconds. Any number may be busy at once (the adapters' in-flight
    limits bound that)."""

    def __init__(self, reactor, *, connect_timeout: float = 3.0, max_idle_per_origin: int = 1024,
                 idle_timeout: float = 60.0, tls_policy=None, user_agent: str = "ambassador",
                 clock=None) -> None:
        self._reactor = reactor
        self._clock = clock or reactor  # times idle connections
        self._connect_timeout = connect_timeout
        self.max_idle_per_origin = max_idle_per_origin
        self.idle_timeout = idle_timeout
        self._tls_policy = tls_policy or BrowserLikePolicyForHTTPS()
        self._user_agent = user_agent
        self._origins: dict[str, Origin] = {}
        # Request heads already written, by everything they are made of: the same request (a hot URL,
        # the same credential) is not encoded again; a rotated secret makes a new key, so a new head.
        self._heads: dict[tuple, bytes] = {}
        self._idle: dict[tuple, list[_Connection]] = {}
        self._sweep_call = None
        self._closing: list[defer.Deferred] = []

    def request(self, base_url: str, request: UpstreamRequest, max_body: int) -> defer.Deferred:
        """A Deferred firing with the UpstreamResponse; cancel it to drop the request's connection."""
        origin = self._origins.get(base_url)
        if origin is None:
            origin = self._origins[base_url] = Origin(base_url)
        key = (base_url, request.method, request.path, request.query, tuple(request.headers.items()))
        head = self._heads.get(key)
        if head is None:
            head = request_head(origin, request, self._user_agent)
            if len(self._heads) >= HEADS_KEPT:
                del self._heads[next(iter(self._heads))]  # the oldest
            self._heads[key] = head
        exchange = _Exchange(self, origin, head, request.method == "HEAD", max_body)
        exchange.start()
        return exchange.deferred

    def idle_connections(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    def _endpoint(self, origin: Origin):
        endpoint = HostnameEndpoint(self._reactor, origin.host, origin.port, timeout=self._connect_timeout)
        if origin.scheme == "https":
            creator = self._tls_policy.creatorForNetloc(origin.host.encode("idna"), origin.port)
            endpoint = wrapClientTLS(creator, endpoint)
        return endpoint

    def _take(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin.key)
        if not idle:
            return None
        connection = idle.pop()  # the most recently used: the least likely to have been closed
        return connection

    def _put(self, connection: _Connection) -> None:
        idle = self._idle.setdefault(connection.origin.key, [])
        connection.idle_since = self._clock.seconds()
        idle.append(connection)
        if len(idle) > self.max_idle_per_origin:
            idle.pop(0).transport.loseConnection()
        if self._sweep_call is None:
            self._sweep_call = self._clock.callLater(self.idle_timeout, self._sweep)

    def _forget(self, connection: _Connection) -> None:
        idle = self._idle.get(connection.origin.key)
        if idle and connection in idle:
            idle.remove(connection)
        if self._closing and not self.idle_connections():
            closing, self._closing = self._closing, []
            for waiting in closing:
                waiting.callback(None)

    def _sweep(self) -> None:
        """Close the connections idle for ``idle_timeout``; come back when the next one will be."""
        self._sweep_call = None
        expired_before = self._clock.seconds() - self.idle_timeout
        oldest = None
        for idle in self._idle.values():
            while idle and idle[0].idle_since <= expired_before:  # oldest first
                idle.pop(0).transport.loseConnection()
            if idle and (oldest is None or idle[0].idle_since < oldest):
                oldest = idle[0].idle_since
        if oldest is not None:
            self._sweep_call = self._clock.callLater(oldest + self.idle_timeout - self._clock.seconds(),
                                                     self._sweep)

    def close(self) -> defer.Deferred:
        """Close every idle connection; fires when they are closed."""
        if self._sweep_call is not None and self._sweep_call.active():
            self._sweep_call.cancel()
        self._sweep_call = None
        if not self.idle_connections():
            return defer.succeed(None)
        closed = defer.Deferred()
        self._closing.append(closed)
        for idle in list(self._idle.values()):
            for connection in list(idle):
                connection.transport.loseConnection()
        return closed
