"""The Redis backend of the shared response cache: bytes in, bytes out, never in the way.

``RedisStore`` keeps one connection to Redis. The protocol is txredisapi's
``RedisProtocol`` (RESP, commands pipelined, replies matched to them in
order, parsed by hiredis); docs/redis-cache.md says why this library. The
store adds what the cache needs around it: it connects in the background
(TLS for ``rediss://``) and reconnects forever with a capped backoff, and a
command fails with ``StoreUnavailable`` at once while there is no connection
and after ``timeout`` seconds without an answer, so a slow or absent Redis
costs a request at most ``timeout``: the cache then goes to the upstream.

The password in the URL is sent in ``AUTH`` and nowhere else: not in
``description``, a repr, an exception or a log event.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

from attrs import field, frozen
from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger(namespace="ambassador")

#: Reconnection waits: BACKOFF_FIRST seconds after a failure, doubling up to BACKOFF_MAX.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0
#: How long each step of connecting (TCP, then AUTH, SELECT, PING; TLS happens during the first) may take.
CONNECT_TIMEOUT = 1.0
URL_FORM = "redis[s]://[[user]:password@]host[:port][/db]"


class StoreUnavailable(Exception):
    """Redis could not be asked (not connected, timed out, error reply)."""


class ErrorReply(StoreUnavailable):
    """Redis answered the command with an error (such as WRONGTYPE: the key holds a list, a hash …)."""


@frozen
class RedisAddress:
    """Where Redis is and how to log in; ``password`` is never shown."""

    host: str
    port: int
    db: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False

    @property
    def description(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'rediss' if self.tls else 'redis'}://{host}:{self.port}/{self.db}"


def parse_redis_url(url: str) -> RedisAddress:
    """``redis[s]://[[user]:password@]host[:port][/db]``; ValueError (never quoting the URL) otherwise."""

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
    if parts.scheme not in ("redis", "rediss"):
        raise wrong("it must start with redis:// (or rediss:// for TLS)")
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
    return RedisAddress(parts.hostname, port or 6379, int(db), username, password, tls=parts.scheme == "rediss")


@functools.cache
def _txredisapi() -> Any:
    """txredisapi, and the protocol the store uses. Imported on first use, not with this module:
    txredisapi imports ``twisted.internet.reactor``, which would install the default reactor before
    twistd (or a test) has chosen one."""
    import txredisapi  # type: ignore[import-untyped]  # no type information shipped

    class Connection(txredisapi.RedisProtocol):
        """txredisapi's protocol, replying in bytes (no decoding, no number conversion), that keeps why
        it ended and drops itself rather than let a reply be taken for another command's."""

        def __init__(self) -> None:
            super().__init__(charset=None, convertNumbers=False)
            self.ended: str | None = None  # why the connection ended (or is ending), once it has

        def end(self, reason: str) -> None:
            """Drop the connection now; commands waiting on it fail (``ended`` says why)."""
            if self.ended is None:
                self.ended = reason
                if self.transport is not None:
                    self.transport.abortConnection()

        def dataReceived(self, data: bytes, unpause: bool = False) -> None:
            try:
                super().dataReceived(data, unpause)
            except txredisapi.InvalidData as e:  # hiredis met bytes that are not RESP
                self.end(f"Redis sent something that is not RESP ({e})")

        def replyReceived(self, reply: object) -> None:
            if self.replyQueue.waiting:
                super().replyReceived(reply)
            else:  # txredisapi would keep it and hand it to the next command
                self.end("Redis sent a reply nobody asked for")

        def connectionLost(self, reason: Failure) -> None:
            if self.ended is None:
                self.ended = _why_lost(reason)
            super().connectionLost(reason)

    return txredisapi, Connection


def _quiet_factory(connection) -> Factory:
    """A factory for the one ``connection``, that does not log each connection's start and stop
    (``connectProtocol``'s does: a line per reconnection attempt)."""
    factory = Factory.forProtocol(lambda: connection)
    factory.noisy = False
    return factory


def _why_lost(reason: Failure) -> str:
    """Why a connection ended, in a few words: OpenSSL's reasons for TLS, Twisted's message otherwise."""
    from OpenSSL import SSL  # Twisted's TLS is pyOpenSSL and service_identity (Twisted[tls])
    from service_identity import VerificationError

    if reason.check(VerificationError):
        return "the TLS connection failed (the certificate does not match the host name)"
    if reason.check(SSL.Error):  # args: [(library, function, reason), ...]
        details = [str(part[-1]) for part in (reason.value.args or [[]])[0] if isinstance(part, tuple)]
        return f"the TLS connection failed ({'; '.join(details) or reason.getErrorMessage()})"
    return f"connection lost ({reason.getErrorMessage()})"


class RedisStore:
    """Bytes under keys in Redis, with a TTL: the shared backend of the response cache.

    ``reactor`` connects (``IReactorTCP``); ``clock`` (the reactor unless
    given) times commands out and paces reconnection. ``on_change(available)``
    is called on the first connection outcome and whenever reachability
    changes, after the change is logged. For ``rediss://``, ``trust_root``
    (an ``IOpenSSLTrustRoot`` such as ``twisted.internet.ssl.Certificate``)
    is what the server's certificate must chain to; by default the system's
    trust store.
    """

    def __init__(self, url: str, reactor, *, timeout: float = 0.25,
                 on_change: Callable[[bool], None] | None = None, clock: IReactorTime | None = None,
                 trust_root: object | None = None) -> None:
        self._address = parse_redis_url(url)
        self.description = self._address.description
        self.timeout = timeout
        self._reactor, self._clock = reactor, clock if clock is not None else reactor
        self._on_change = on_change
        self._trust_root = trust_root
        self._running = False
        self._connection: Any = None  # the one in use, once AUTH and SELECT are done
        self._open: set = set()  # every connection not yet closed
        self._attempt: Deferred | None = None
        self._retry: IDelayedCall | None = None
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
        closing = [connection.whenDisconnected() for connection in self._open]
        for connection in list(self._open):
            connection.end("the Redis store was stopped")
        return defer.DeferredList(closing).addCallback(lambda _: None)

    def get(self, key: bytes, limit: int | None = None) -> Deferred:
        """The value under ``key``, or None when there is none (or it expired).

        With ``limit``, at most ``limit + 1`` bytes of it cross the network (``GETRANGE``): a longer
        value shows as longer than ``limit`` and costs no more; an empty one is none. What comes back
        is whatever Redis holds, to be checked by the caller (it may not even be bytes).
        """
        if limit is None:
            return self._ask(self._connection, lambda redis: redis.get(key))
        return self._ask(self._connection, lambda redis: redis.execute_command("GETRANGE", key, 0, limit)
                         ).addCallback(lambda value: None if value == b"" else value)

    def set(self, key: bytes, value: bytes, ttl: float) -> Deferred:
        """Keep ``value`` under ``key`` for ``ttl`` seconds (rounded up to whole milliseconds)."""
        if not (math.isfinite(ttl) and ttl > 0):
            raise ValueError(f"a Redis TTL must be a positive number of seconds, not {ttl!r}")
        milliseconds = math.ceil(ttl * 1000)
        return self._ask(self._connection, lambda redis: redis.set(key, value, pexpire=milliseconds)).addCallback(
            lambda _: None)

    def script(self, source: bytes, keys: list[bytes], args: list[bytes | int | float]) -> Deferred:
        """The reply of the Lua script ``source`` run atomically on ``keys`` with ``args`` (``EVALSHA``,
        falling back to ``EVAL`` when Redis does not know the script yet)."""
        return self._ask(self._connection, lambda redis: redis.eval(source, keys, args))

    def _ask(self, connection, command: Callable[[Any], Deferred], timeout: float | None = None) -> Deferred:
        """``command(connection)``'s reply, or StoreUnavailable. Without an answer within ``timeout``
        (the store's unless given) the connection is dropped with every command waiting on it, so a
        late reply can never be taken for another command's."""
        if connection is None:
            return defer.fail(StoreUnavailable(f"not connected to {self.description}"))
        txredisapi, _ = _txredisapi()
        timeout = self.timeout if timeout is None else timeout
        answer = defer.maybeDeferred(command, connection).addTimeout(timeout, self._clock)

        def failed(failure: Failure):
            if failure.check(defer.TimeoutError):
                reason = f"no answer within {timeout:g} s"
                self._drop(connection, reason)
            elif failure.check(txredisapi.ResponseError):
                raise ErrorReply(f"Redis answered an error: {failure.value}")
            elif failure.check(txredisapi.ConnectionError):  # lost, or not connected yet
                reason = connection.ended or "not connected"
            elif failure.check(defer.CancelledError):  # the caller, or stop(), gave up on it
                return failure
            else:
                reason = f"unexpected reply ({failure.getErrorMessage()})"
            raise StoreUnavailable(reason)

        return answer.addErrback(failed)

    def _endpoint(self):
        host, port = self._address.host, self._address.port
        if isIPAddress(host):  # no name to resolve: one address, and a refusal is known at once
            endpoint = TCP4ClientEndpoint(self._reactor, host, port)
        elif isIPv6Address(host):
            endpoint = TCP6ClientEndpoint(self._reactor, host, port)
        else:
            endpoint = HostnameEndpoint(self._reactor, host, port)
        if self._address.tls:
            from twisted.internet.ssl import optionsForClientTLS  # needs pyOpenSSL: only for rediss://

            endpoint = wrapClientTLS(optionsForClientTLS(host, trustRoot=self._trust_root), endpoint)
        return endpoint

    def _connect(self) -> None:
        self._retry = None
        _, Connection = _txredisapi()
        connection = Connection()
        self._attempt = defer.ensureDeferred(self._log_in(connection))
        self._attempt.addCallbacks(self._connected, self._failed, callbackArgs=(connection,),
                                   errbackArgs=(connection,))

    async def _log_in(self, connection) -> None:
        try:
            await self._endpoint().connect(_quiet_factory(connection)).addTimeout(CONNECT_TIMEOUT, self._clock)
        except defer.TimeoutError:
            raise StoreUnavailable(f"could not connect within {CONNECT_TIMEOUT:g} s") from None
        self._open.add(connection)
        connection.whenDisconnected().addCallback(self._closed)
        address = self._address
        steps: list[tuple[str, Callable[[Any], Deferred]]] = []
        if address.password is not None:
            # As bytes: a password that came through the environment with undecodable bytes is sent
            # as it was, and no encoding error can quote it.
            password = address.password.encode("utf-8", "surrogateescape")
            username = address.username.encode("utf-8", "surrogateescape") if address.username else None
            steps.append(("AUTH", lambda redis: redis.auth(password, username)))
        if address.db:
            steps.append((f"SELECT {address.db}", lambda redis: redis.select(address.db)))
        steps.append(("PING", lambda redis: redis.ping()))
        for what, command in steps:
            try:
                await self._ask(connection, command, timeout=CONNECT_TIMEOUT)
            except StoreUnavailable as e:
                raise StoreUnavailable(f"{what} failed: {e}") from None

    def _connected(self, _, connection) -> None:
        self._attempt = None
        self._delay = BACKOFF_FIRST
        self._connection = connection
        self._changed(True, None)

    def _failed(self, failure: Failure, connection) -> None:
        self._attempt = None
        if failure.check(StoreUnavailable):
            reason = str(failure.value)
        elif failure.check(defer.CancelledError):
            reason = "the Redis store was stopped"
        else:  # refused, unreachable, DNS: Twisted's messages name the host at most
            reason = f"could not connect ({failure.getErrorMessage()})"
        connection.end(reason)
        if not self._running:  # stop() cancelled the attempt
            return
        self._changed(False, reason)
        self._schedule()

    def _closed(self, connection) -> None:
        self._open.discard(connection)
        self._drop(connection, connection.ended)

    def _drop(self, connection, reason: str) -> None:
        """``connection`` is of no more use: end it, and if it was the one in use, reconnect."""
        connection.end(reason)
        if connection is not self._connection:  # one being logged in, or one stop() let go of
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
            if password and reason:  # nothing Redis or Twisted says holds it; this keeps it that way
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
