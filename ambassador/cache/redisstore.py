"""The Redis backend of the shared response cache: bytes in, bytes out, never in the way.

``RedisStore`` keeps one connection to Redis, speaking RESP2 itself (a
small ``Protocol``; replies are matched to commands in order). It connects
in the background and reconnects forever with a capped backoff. A command
fails with ``StoreUnavailable`` at once while there is no connection and
after ``timeout`` seconds without an answer, so a slow or absent Redis
costs a request at most ``timeout``: the cache then goes to the upstream.

The password in the URL is sent in ``AUTH`` and nowhere else: not in
``description``, a repr, an exception or a log event.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from urllib.parse import unquote, urlsplit

from attrs import field, frozen
from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger(namespace="ambassador")

#: Reconnection waits: BACKOFF_FIRST seconds after a failure, doubling up to BACKOFF_MAX.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0
#: How long a TCP connection attempt may take.
CONNECT_TIMEOUT = 1.0
URL_FORM = "redis://[[user]:password@]host[:port][/db]"


class StoreUnavailable(Exception):
    """Redis could not be asked (not connected, timed out, error reply)."""


class _ErrorReply(Exception):
    """Redis answered ``-ERR ...``."""


class _ProtocolError(Exception):
    """What came back is not RESP2."""


@frozen
class RedisAddress:
    """Where Redis is and how to log in; ``password`` is never shown."""

    host: str
    port: int
    db: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def description(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{host}:{self.port}/{self.db}"


def parse_redis_url(url: str) -> RedisAddress:
    """``redis://[[user]:password@]host[:port][/db]``; ValueError (never quoting the URL) otherwise."""

    def wrong(why: str) -> ValueError:
        return ValueError(f"the Redis URL must look like {URL_FORM}: {why}")

    try:
        parts = urlsplit(url)
    except ValueError:
        raise wrong("it cannot be read as a URL") from None
    try:
        port = parts.port
    except ValueError:
        raise wrong("the port is not a number from 0 to 65535") from None
    if parts.scheme != "redis":
        raise wrong("it must start with redis://")
    if not parts.hostname:
        raise wrong("the host is missing")
    if parts.query or parts.fragment:
        raise wrong("it takes no ?query or #fragment")
    db = parts.path.strip("/") or "0"
    if not (db.isascii() and db.isdigit()):
        raise wrong("the database after the host must be a number")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    if username and not password:
        raise wrong("a user name needs a password (redis://user:password@host)")
    return RedisAddress(parts.hostname, port or 6379, int(db), username, password)


def _encode(args: tuple[bytes | str | int, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        arg = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


def _parse(buffer: bytearray, start: int):
    """The reply at ``start``: ``(reply, where the next one starts)``, or None when it is not all there.
    Bulk strings are bytes, simple strings str, errors ``_ErrorReply``, nil None."""
    end = buffer.find(b"\r\n", start)
    if end < 0:
        return None
    kind, line, after = buffer[start:start + 1], bytes(buffer[start + 1:end]), end + 2
    try:
        if kind == b"+":
            return line.decode("utf-8", "replace"), after
        if kind == b"-":
            return _ErrorReply(line.decode("utf-8", "replace")), after
        if kind == b":":
            return int(line), after
        if kind == b"$":
            length = int(line)
            if length < 0:
                return None, after
            if len(buffer) < after + length + 2:
                return None
            return bytes(buffer[after:after + length]), after + length + 2
        if kind == b"*":
            items = []
            for _ in range(int(line)):  # *-1 (a nil array) runs no round: []
                parsed = _parse(buffer, after)
                if parsed is None:
                    return None
                item, after = parsed
                items.append(item)
            return (items if int(line) >= 0 else None), after
    except ValueError:
        pass
    raise _ProtocolError(f"unexpected reply {bytes(buffer[start:end])[:40]!r}")


class RESPConnection(Protocol):
    """One connection to Redis: commands are pipelined, replies matched to them in order.

    A command not answered within ``timeout`` seconds on ``clock`` fails, and
    the connection is dropped with everything still waiting on it, so a late
    reply can never be taken for another command's. ``on_lost(reason)`` is
    called once when the connection ends; ``closed`` fires when it is gone.
    """

    def __init__(self, clock: IReactorTime, timeout: float) -> None:
        self._clock, self._timeout = clock, timeout
        self._buffer = bytearray()
        self._waiting: deque[tuple[Deferred, object]] = deque()
        self.ended: str | None = None  # why the connection ended, once it has
        self.on_lost: Callable[[str], None] | None = None
        self.closed = Deferred()

    def command(self, *args: bytes | str | int) -> Deferred:
        if self.ended is not None:
            return defer.fail(StoreUnavailable(self.ended))
        answer = Deferred()
        timer = self._clock.callLater(self._timeout, self._end, f"no answer within {self._timeout:g} s")
        self._waiting.append((answer, timer))
        self.transport.write(_encode(args))
        return answer

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        start = 0
        while self._waiting and self.ended is None:
            try:
                parsed = _parse(self._buffer, start)
            except _ProtocolError as e:
                self._end(str(e))
                return
            if parsed is None:
                break
            reply, start = parsed
            answer, timer = self._waiting.popleft()
            timer.cancel()
            if not answer.called:  # its caller may have cancelled it
                if isinstance(reply, _ErrorReply):
                    answer.errback(StoreUnavailable(f"Redis answered an error: {reply}"))
                else:
                    answer.callback(reply)
        del self._buffer[:start]
        if self._buffer and not self._waiting and self.ended is None:
            self._end("Redis sent a reply nobody asked for")

    def close(self, reason: str) -> None:
        """Drop the connection now; waiting commands fail with ``reason``."""
        self._end(reason)

    def connectionLost(self, reason: Failure) -> None:
        self._end(f"connection lost ({reason.getErrorMessage()})", drop=False)
        self.closed.callback(None)

    def _end(self, reason: str, drop: bool = True) -> None:
        """Drop the connection, tell ``on_lost``, fail every waiting command with ``reason``."""
        if self.ended is not None:
            return
        self.ended = reason
        if drop:
            self.transport.abortConnection()
        if self.on_lost is not None:
            self.on_lost(reason)
        waiting, self._waiting = self._waiting, deque()
        for answer, timer in waiting:
            if timer.active():
                timer.cancel()
            if not answer.called:
                answer.errback(StoreUnavailable(reason))


class RedisStore:
    """Bytes under keys in Redis, with a TTL: the shared backend of the response cache.

    ``reactor`` connects (``IReactorTCP``); ``clock`` (the reactor unless
    given) times commands out and paces reconnection. ``on_change(available)``
    is called on the first connection outcome and whenever reachability
    changes, after the change is logged.
    """

    def __init__(self, url: str, reactor, *, timeout: float = 0.25,
                 on_change: Callable[[bool], None] | None = None, clock: IReactorTime | None = None) -> None:
        self._address = parse_redis_url(url)
        self.description = self._address.description
        self.timeout = timeout
        self._reactor, self._clock = reactor, clock if clock is not None else reactor
        self._on_change = on_change
        self._running = False
        self._connection: RESPConnection | None = None  # the one in use, once AUTH and SELECT are done
        self._open: set[RESPConnection] = set()  # every connection not yet closed
        self._attempt: Deferred | None = None
        self._retry = None
        self._delay = BACKOFF_FIRST
        self._reachable: bool | None = None  # what was last logged; None before the first outcome

    def __repr__(self) -> str:
        return f"<RedisStore {self.description} {'available' if self.available else 'unavailable'}>"

    @property
    def available(self) -> bool:
        return self._connection is not None

    def start(self) -> None:
        """Connect in the background; from now on, reconnect whenever the connection is lost."""
        if not self._running:
            self._running = True
            self._connect()

    def stop(self) -> Deferred:
        """Stop reconnecting and close the connection; fires once it is closed."""
        self._running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self._attempt is not None:
            self._attempt.cancel()
        self._connection = None
        closing = [connection.closed for connection in self._open]
        for connection in list(self._open):
            connection.close("the Redis store was stopped")
        return defer.DeferredList(closing).addCallback(lambda _: None)

    def get(self, key: bytes) -> Deferred:
        """The value under ``key``, or None when there is none (or it expired)."""
        return self._command(b"GET", key)

    def set(self, key: bytes, value: bytes, ttl: float) -> Deferred:
        """Keep ``value`` under ``key`` for ``ttl`` seconds (rounded up to whole milliseconds)."""
        if not (math.isfinite(ttl) and ttl > 0):
            raise ValueError(f"a Redis TTL must be a positive number of seconds, not {ttl!r}")
        return self._command(b"SET", key, value, b"PX", math.ceil(ttl * 1000)).addCallback(lambda _: None)

    def _command(self, *args) -> Deferred:
        if self._connection is None:
            return defer.fail(StoreUnavailable(f"not connected to {self.description}"))
        return self._connection.command(*args)

    def _connect(self) -> None:
        self._retry = None
        host, port = self._address.host, self._address.port
        if isIPAddress(host):  # no name to resolve: one address, and a refusal is known at once
            endpoint = TCP4ClientEndpoint(self._reactor, host, port)
        elif isIPv6Address(host):
            endpoint = TCP6ClientEndpoint(self._reactor, host, port)
        else:
            endpoint = HostnameEndpoint(self._reactor, host, port)
        connection = RESPConnection(self._clock, self.timeout)
        connecting = connectProtocol(endpoint, connection)
        connecting.addTimeout(CONNECT_TIMEOUT, self._clock)
        self._attempt = connecting.addCallback(lambda _: defer.ensureDeferred(self._log_in(connection)))
        self._attempt.addCallbacks(self._connected, self._failed, callbackArgs=(connection,))

    async def _log_in(self, connection: RESPConnection) -> None:
        self._open.add(connection)
        connection.closed.addCallback(lambda _: self._open.discard(connection))
        address = self._address
        try:
            if address.password is not None:
                user = (address.username,) if address.username else ()
                await self._step(connection.command(b"AUTH", *user, address.password), "AUTH")
            if address.db:
                await self._step(connection.command(b"SELECT", address.db), f"SELECT {address.db}")
            await self._step(connection.command(b"PING"), "PING")
        except BaseException:
            connection.transport.abortConnection()
            raise

    @staticmethod
    async def _step(answer: Deferred, what: str) -> None:
        try:
            await answer
        except StoreUnavailable as e:
            raise StoreUnavailable(f"{what} failed: {e}") from None

    def _connected(self, _, connection: RESPConnection) -> None:
        self._attempt = None
        self._delay = BACKOFF_FIRST
        self._connection = connection
        connection.on_lost = lambda reason: self._lost(connection, reason)
        self._changed(True, None)

    def _failed(self, failure: Failure) -> None:
        self._attempt = None
        if not self._running:  # stop() cancelled the attempt
            return
        if failure.check(defer.TimeoutError):
            reason = f"could not connect within {CONNECT_TIMEOUT:g} s"
        elif failure.check(StoreUnavailable):
            reason = str(failure.value)
        else:  # refused, unreachable, DNS: Twisted's messages name the host at most
            reason = f"could not connect ({failure.getErrorMessage()})"
        self._changed(False, reason)
        self._schedule()

    def _lost(self, connection: RESPConnection, reason: str) -> None:
        if connection is not self._connection:  # one that stop() already let go of
            return
        self._connection = None
        if self._running:
            self._changed(False, reason)
            self._schedule()

    def _schedule(self) -> None:
        self._retry = self._clock.callLater(self._delay, self._connect)
        self._delay = min(self._delay * 2, BACKOFF_MAX)

    def _changed(self, reachable: bool, reason: str | None) -> None:
        if reachable == self._reachable:
            return
        first, self._reachable = self._reachable is None, reachable
        if reachable:
            log.info("Redis cache {redis} is {state}", redis=self.description,
                     state="connected" if first else "reachable again")
        else:
            password = self._address.password
            if password:  # nothing Redis or Twisted says holds it; this keeps it that way
                reason = reason.replace(password, "[REDACTED]")
            log.warn("Redis cache {redis} is unreachable: {reason}; serving without it and reconnecting "
                     "(every {backoff_max:g} s at most)", redis=self.description, reason=reason,
                     backoff_max=BACKOFF_MAX)
        if self._on_change is not None:
            try:
                self._on_change(reachable)
            except Exception:
                log.failure("on_change({reachable}) of the Redis store {redis} failed", reachable=reachable,
                            redis=self.description)
