"""The process's one HTTP client for upstream calls: treq over one persistent Agent pool.

Contract (what the pipeline relies on): ``UpstreamClient.fetch(base_url,
request, max_body=..., accept_encoding=...)`` returns a Deferred that fires with an
``UpstreamResponse`` holding the whole answer, identity-encoded (a gzip answer
is decoded, see ``ambassador.pipeline.decoding``), or fails with exactly one of

- ``ResponseTooLarge(limit)``: the answer held more than ``max_body`` bytes,
  counted decoded (the connection is dropped at the cap);
- ``UnreadableAnswer(reason)``: a corrupt gzip stream, or a content coding
  other than gzip;
- ``UpstreamFailed(reason)``: no complete answer arrived (could not connect,
  TLS refused, connection lost or cut short); ``reason`` is a phrase for a
  problem's detail, never a secret;
- ``CancelledError``: the Deferred was cancelled (caller left, timeout).
"""

from __future__ import annotations

from http.cookiejar import DefaultCookiePolicy
from urllib.parse import quote, urlencode

import re
from typing import cast

from OpenSSL.SSL import Error as TLSError
from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from ambassador import __version__
from ambassador.exchange import UpstreamRequest, UpstreamResponse
from ambassador.pipeline.decoding import ACCEPT_ENCODINGS, DecodingAgent, UnreadableAnswer

__all__ = ["DEFAULT_MAX_RESPONSE_BYTES", "USER_AGENT", "ResponseTooLarge", "UnreadableAnswer", "UpstreamClient",
           "UpstreamFailed"]

USER_AGENT = f"ambassador/{__version__}"
#: The most an upstream answer may hold unless the adapter sets ``max_response_bytes``.
DEFAULT_MAX_RESPONSE_BYTES = 10 * 1024 * 1024
#: Idle connections kept per upstream. Busy ones are not bounded here (the adapters' in-flight limits
#: bound them); this only says how many survive a burst, so that the next one does not reconnect.
#: Twisted's default of 2 would reconnect under any real concurrency.
MAX_IDLE_PER_HOST = 128

CUT = "the connection failed before a complete answer arrived"
# What may stand in a request path unquoted (RFC 3986 pchar and "/").
_PLAIN_PATH = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*\Z")


class ResponseTooLarge(Exception):
    """The upstream answer was longer than its adapter's limit; the rest was not read."""

    @property
    def limit(self) -> int:
        return self.args[0]


class UpstreamFailed(Exception):
    """No complete answer came from the upstream; the argument says why, in words for a problem's detail."""

    @property
    def reason(self) -> str:
        return self.args[0]


class UpstreamClient:
    """The process's HTTP client, shared by every adapter (and, with ``endpoints``, by peer asks).

    Every request goes through one treq ``HTTPClient`` over one persistent
    ``HTTPConnectionPool``: up to ``max_idle_per_host`` idle connections per
    upstream, each closed after ``idle_timeout`` seconds. No redirect is
    followed (a Location may point elsewhere and the credential would follow),
    no cookie is kept (one caller's cookies must not reach the next), and
    HTTPS is verified through ``tls_policy`` (``BrowserLikePolicyForHTTPS``:
    the system trust store, host name checked) unless ``endpoints`` says
    where to connect instead (a callable from the request's URI to an
    endpoint).
    """

    def __init__(
        self,
        reactor,
        *,
        connect_timeout: float = 3.0,
        max_idle_per_host: int = MAX_IDLE_PER_HOST,
        idle_timeout: float = 60.0,
        tls_policy=None,
        endpoints=None,
        user_agent: str = USER_AGENT,
    ) -> None:
        self._user_agent = user_agent
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = max_idle_per_host
        self._pool.cachedConnectionTimeout = idle_timeout  # type: ignore[assignment]  # annotated int; a delay
        if endpoints is None:
            endpoints = _TCPEndpoints(reactor, connect_timeout, tls_policy or BrowserLikePolicyForHTTPS())
        self._closes = _CloseReasons()
        agent = DecodingAgent(Agent.usingEndpointFactory(reactor, _Watched(endpoints, self._closes), pool=self._pool))
        # treq wraps the Agent in a CookieAgent over this jar: a jar that keeps nothing.
        nothing = IndexableCookieJar(DefaultCookiePolicy(allowed_domains=[]))
        self._http = HTTPClient(agent, cookiejar=nothing)

    def fetch(self, base_url: str, request: UpstreamRequest, *, max_body: int = DEFAULT_MAX_RESPONSE_BYTES,
              accept_encoding: str = "identity") -> defer.Deferred:
        """A Deferred firing with the UpstreamResponse; cancelling it drops the request.

        ``accept_encoding="gzip"`` asks the upstream for a gzip answer (decoded before it is returned).
        """
        if accept_encoding not in ACCEPT_ENCODINGS:
            raise ValueError(f"accept_encoding: expected one of {', '.join(ACCEPT_ENCODINGS)}")
        return defer.ensureDeferred(self._fetch(base_url, request, max_body, accept_encoding)).addErrback(
            _as_contracted)

    async def _fetch(self, base_url: str, request: UpstreamRequest, max_body: int,
                     accept_encoding: str) -> UpstreamResponse:
        path = request.path or "/"
        if not _PLAIN_PATH.match(path):
            path = quote(path, safe="/:@!$&'()*+,;=-._~%")
        url = base_url + path
        if request.query:
            url += "?" + urlencode(request.query)
        headers = Headers({"User-Agent": [self._user_agent]})
        for name, value in request.headers.items():
            headers.setRawHeaders(name, [value])
        if accept_encoding == "gzip":  # the adapter's choice, not a caller's header
            headers.setRawHeaders("Accept-Encoding", ["gzip"])
        else:
            headers.removeHeader("Accept-Encoding")
        response = await self._http.request(request.method, url, headers=headers, data=request.body,
                                            allow_redirects=False, unbuffered=True)
        collector = _Collector(max_body, response.length, self._closes)
        response.deliverBody(collector)
        body = await collector.done
        return UpstreamResponse(status=response.code, headers=_headers(response.headers), body=body)

    def close(self) -> defer.Deferred:
        return self._pool.closeCachedConnections()


def _headers(raw: Headers) -> dict[str, str]:
    headers = {name.decode("latin-1").lower(): b", ".join(values).decode("latin-1")
               for name, values in raw.getAllRawHeaders()}
    # treq's ContentDecoderAgent leaves an empty Content-Encoding on an answer that had none.
    if headers.get("content-encoding") == "":
        del headers["content-encoding"]
    return headers


class _Collector(Protocol):
    """Reads a body into one buffer, at most ``limit`` bytes however it arrives; drops the connection past it."""

    def __init__(self, limit: int, length, closes: _CloseReasons) -> None:
        self._limit = limit
        self._closes = closes
        self._declared = None if length is UNKNOWN_LENGTH else length
        self._buffer = bytearray()
        self._too_large = False
        self.done: defer.Deferred[bytes] = defer.Deferred(lambda _: self._producer().stopProducing())

    def connectionMade(self) -> None:
        if self._declared is not None and self._declared > self._limit:
            self._drop()

    def dataReceived(self, data: bytes) -> None:
        if self._too_large:
            return
        if len(self._buffer) + len(data) > self._limit:
            self._drop()
            return
        self._buffer += data

    def _drop(self) -> None:
        self._too_large = True
        self._buffer = bytearray()
        self._producer().stopProducing()

    def _producer(self) -> IPushProducer:
        # deliverBody's transport: the body's producer (IResponse.deliverBody), typed as a plain transport.
        return cast(IPushProducer, self.transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:  # cancelled
            return
        if self._too_large:
            self.done.errback(ResponseTooLarge(self._limit))
        elif reason.check(UnreadableAnswer):
            self.done.errback(reason)
        elif reason.check(ResponseDone) or (reason.check(PotentialDataLoss) and self._closes.clean):
            self.done.callback(bytes(self._buffer))
        else:
            # Fewer bytes than Content-Length, a broken chunk, or a close-delimited body ended by a reset.
            self.done.errback(UpstreamFailed(CUT))


class _CloseReasons:
    """Whether the connection closing right now closed cleanly.

    Twisted ends a close-delimited body with PotentialDataLoss whether the
    upstream closed or the connection was reset. The body's connectionLost
    runs inside the connection's (synchronously), so the connection's wrapper
    sets this for that call.
    """

    clean = False


class _Watched:
    """Endpoints (``endpointForURI``) whose connections say, as they close, how they closed."""

    def __init__(self, endpoints, closes: _CloseReasons) -> None:
        self._endpoints = endpoints
        self._closes = closes

    def endpointForURI(self, uri):
        return _WatchedEndpoint(self._endpoints(uri), self._closes)


class _WatchedEndpoint:
    def __init__(self, endpoint, closes: _CloseReasons) -> None:
        self._endpoint = endpoint
        self._closes = closes

    def connect(self, factory):
        factory.noisy = False  # else Twisted logs "Starting factory" for every upstream connection
        wrapping = _WatchingFactory(factory, self._closes)
        return self._endpoint.connect(wrapping).addCallback(lambda wrapper: wrapper.wrappedProtocol)


class _Watching(ProtocolWrapper):
    def connectionLost(self, reason: Failure = connectionDone) -> None:
        closes = self.factory.closes
        closes.clean = reason.check(error.ConnectionDone) is not None
        try:
            super().connectionLost(reason)
        finally:
            closes.clean = False


class _WatchingFactory(WrappingFactory):
    protocol = _Watching
    noisy = False

    def __init__(self, wrapped, closes: _CloseReasons) -> None:
        super().__init__(wrapped)
        self.closes = closes


class _TCPEndpoints:
    """The endpoint for an upstream URI: TCP to its host and port, TLS verified by ``policy`` for https."""

    def __init__(self, reactor, timeout: float, policy) -> None:
        self._reactor, self._timeout, self._policy = reactor, timeout, policy

    def __call__(self, uri):
        endpoint = HostnameEndpoint(self._reactor, uri.host, uri.port, timeout=self._timeout)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self._policy.creatorForNetloc(uri.host, uri.port), endpoint)
        return endpoint


def _as_contracted(failure: Failure) -> Failure:
    """A failure of the call as one of the contract's four kinds (anything else passes unchanged)."""
    if failure.check(defer.CancelledError, ResponseTooLarge, UnreadableAnswer, UpstreamFailed):
        return failure
    # treq reports a cancelled request as ResponseNeverReceived wrapping CancelledError: a caller who
    # left, not an unreachable upstream.
    if _caused_by(failure.value, defer.CancelledError):
        return Failure(defer.CancelledError())
    if _caused_by(failure.value, TLSError):
        reason = "the TLS handshake failed (certificate not trusted or wrong host)"
    elif failure.check(error.ConnectError, error.TimeoutError, error.DNSLookupError):
        reason = f"could not connect ({_describe(failure.value)})"
    elif failure.check(ResponseFailed, ResponseNeverReceived, RequestTransmissionFailed, RequestNotSent,
                       error.ConnectionLost, error.ConnectionDone):
        reason = CUT
    else:
        return failure
    return Failure(UpstreamFailed(reason))


def _describe(exc: BaseException) -> str:
    return {
        error.ConnectionRefusedError: "connection refused",
        error.DNSLookupError: "host name not found",
        error.TCPTimedOutError: "connect timed out",
        error.TimeoutError: "connect timed out",
    }.get(type(exc), type(exc).__name__)


def _caused_by(exc: BaseException, kind: type) -> bool:
    if isinstance(exc, kind):
        return True
    return any(_caused_by(reason.value, kind) for reason in getattr(exc, "reasons", ()))
