"""The process's one HTTP client for upstream calls: treq over one persistent Agent pool.

Contract (what the pipeline relies on): ``UpstreamClient.fetch(base_url,
request, max_body=..., egress=..., accept_encoding=...)`` returns a Deferred that fires with an
``UpstreamResponse`` holding the whole answer, identity-encoded (a gzip answer
is decoded, see ``ambassador.pipeline.decoding``), or fails with exactly one of

- ``ResponseTooLarge(limit)``: the answer held more than ``max_body`` bytes,
  counted decoded (the connection is dropped at the cap);
- ``UnreadableAnswer(reason)``: a corrupt gzip stream, or a content coding
  other than gzip;
- ``UpstreamFailed(reason)``: no complete answer arrived (could not connect,
  TLS refused, connection lost or cut short); ``reason`` is a phrase for a
  problem's detail, never a secret;
- ``ProxyFailed(reason)``: the forward proxy did not carry the request (could
  not be reached, refused, stalled: ``timed_out``); ``reason`` names the proxy,
  never its credentials or the upstream;
- ``CancelledError``: the Deferred was cancelled (caller left, timeout).
"""

from __future__ import annotations

from functools import partial
from http.cookiejar import DefaultCookiePolicy
from urllib.parse import quote, urlencode

import re
from typing import cast

from OpenSSL.SSL import Error as TLSError
from service_identity import VerificationError as CertificateNameMismatch
from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet import defer, error
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import Certificate
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
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
from ambassador.pipeline.egress import DEFAULT_EGRESS, Egress, EgressAgent, Routes
from ambassador.pipeline.proxies import DIRECT, ProxyEnvironment
from ambassador.pipeline.tunnel import ProxyFailed, why_not_connected

__all__ = ["DEFAULT_MAX_RESPONSE_BYTES", "USER_AGENT", "ProxyFailed", "ResponseTooLarge", "UnreadableAnswer",
           "UpstreamClient", "UpstreamFailed"]

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

    Every request goes through a treq ``HTTPClient`` over a persistent
    ``HTTPConnectionPool``, one of each per distinct ``Egress`` (adapters with
    equal egress share them): up to ``max_idle_per_host`` idle connections per
    upstream, each closed after ``idle_timeout`` seconds. No redirect is
    followed (a Location may point elsewhere and the credential would follow),
    no cookie is kept (one caller's cookies must not reach the next), and
    HTTPS is verified against the system trust store plus ``ca_certificates``
    (``--ca-file``), host name checked, or by ``tls_policy`` when given.
    ``proxies`` are the forward proxies an egress without its own uses (the
    environment's, for the adapters' client; none by default: peer and
    primary asks stay on this host). ``endpoints`` (a callable from the
    request's URI to an endpoint) says where to connect instead. ``clock``
    times a proxy's answer to CONNECT (within ``connect_timeout``).
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
        proxies: ProxyEnvironment = DIRECT,
        ca_certificates: tuple[Certificate, ...] = (),
        clock=None,
    ) -> None:
        self._reactor, self._clock = reactor, clock or reactor
        self._user_agent = user_agent
        self._connect_timeout, self._max_idle, self._idle_timeout = connect_timeout, max_idle_per_host, idle_timeout
        self._tls_policy, self._endpoints = tls_policy, endpoints
        self._proxies, self._ca = proxies, tuple(ca_certificates)
        self._closes = _CloseReasons()
        self._pools: list[HTTPConnectionPool] = []
        self._clients: dict[tuple, HTTPClient] = {}

    def through(self, egress: Egress) -> BoundClient:
        """This client as one adapter's: its ``fetch`` goes out as ``egress`` says (OAuth2 token requests)."""
        return BoundClient(self, egress)

    def _client_for(self, egress: Egress) -> HTTPClient:
        key = egress.key
        if key not in self._clients:
            self._clients[key] = self._new_client(egress)
        return self._clients[key]

    def _new_client(self, egress: Egress) -> HTTPClient:
        reactor = self._reactor
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = self._max_idle
        pool.cachedConnectionTimeout = self._idle_timeout  # type: ignore[assignment]  # annotated int; a delay
        self._pools.append(pool)
        if self._endpoints is not None:
            agent = Agent.usingEndpointFactory(reactor, _Watched(self._endpoints, self._closes), pool=pool)
        else:
            routes = Routes(reactor, self._clock, egress.proxies or self._proxies,
                            self._tls_policy or egress.tls_policy(self._ca), self._connect_timeout)
            agent = EgressAgent(reactor, routes, Agent.usingEndpointFactory(reactor, _Watched(routes, self._closes),
                                                                            pool=pool),
                                pool, lambda endpoint: _WatchedEndpoint(lambda: endpoint, self._closes))
        # treq wraps the Agent in a CookieAgent over this jar: a jar that keeps nothing.
        nothing = IndexableCookieJar(DefaultCookiePolicy(allowed_domains=[]))
        return HTTPClient(DecodingAgent(agent), cookiejar=nothing)

    def fetch(self, base_url: str, request: UpstreamRequest, *, max_body: int = DEFAULT_MAX_RESPONSE_BYTES,
              egress: Egress = DEFAULT_EGRESS, accept_encoding: str = "identity") -> defer.Deferred:
        """A Deferred firing with the UpstreamResponse; cancelling it drops the request.

        ``accept_encoding="gzip"`` asks the upstream for a gzip answer (decoded before it is returned).
        """
        if accept_encoding not in ACCEPT_ENCODINGS:
            raise ValueError(f"accept_encoding: expected one of {', '.join(ACCEPT_ENCODINGS)}")
        return defer.ensureDeferred(self._fetch(base_url, request, max_body, egress, accept_encoding)).addErrback(
            _as_contracted)

    async def _fetch(self, base_url: str, request: UpstreamRequest, max_body: int,
                     egress: Egress, accept_encoding: str) -> UpstreamResponse:
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
        response = await self._client_for(egress).request(request.method, url, headers=headers, data=request.body,
                                            allow_redirects=False, unbuffered=True)
        collector = _Collector(max_body, response.length, self._closes)
        response.deliverBody(collector)
        body = await collector.done
        return UpstreamResponse(status=response.code, headers=_headers(response.headers), body=body)

    def close(self) -> defer.Deferred:
        return defer.DeferredList([pool.closeCachedConnections() for pool in self._pools])


class BoundClient:
    """An UpstreamClient whose ``fetch`` goes out through one adapter's egress."""

    def __init__(self, client: UpstreamClient, egress: Egress) -> None:
        self._client, self._egress = client, egress

    def fetch(self, base_url: str, request: UpstreamRequest, *,
              max_body: int = DEFAULT_MAX_RESPONSE_BYTES) -> defer.Deferred:
        return self._client.fetch(base_url, request, max_body=max_body, egress=self._egress)


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
        # isinstance, not Failure.check: check compares qualified class names it formats on every call.
        why = reason.value
        if self._too_large:
            self.done.errback(ResponseTooLarge(self._limit))
        elif isinstance(why, UnreadableAnswer):
            self.done.errback(reason)
        elif isinstance(why, ResponseDone) or (isinstance(why, PotentialDataLoss) and self._closes.clean):
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
        # The Agent asks for an endpoint on every request but connects one only when its pool has no idle
        # connection: the endpoint (a HostnameEndpoint, for https the TLS options and their context, some
        # 10 and 70 µs) is made then, not for every request.
        return _WatchedEndpoint(partial(self._endpoints, uri), self._closes)


class _WatchedEndpoint:
    """The endpoint ``make`` returns, made when connected, whose connections say how they closed."""

    def __init__(self, make, closes: _CloseReasons) -> None:
        self._make = make
        self._closes = closes

    def connect(self, factory):
        factory.noisy = False  # else Twisted logs "Starting factory" for every upstream connection
        wrapping = _WatchingFactory(factory, self._closes)
        return self._make().connect(wrapping).addCallback(lambda wrapper: wrapper.wrappedProtocol)


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


def _as_contracted(failure: Failure) -> Failure:
    """A failure of the call as one of the contract's kinds (anything else passes unchanged)."""
    if failure.check(defer.CancelledError, ResponseTooLarge, UnreadableAnswer, UpstreamFailed, ProxyFailed):
        return failure
    # treq reports a cancelled request as ResponseNeverReceived wrapping CancelledError: a caller who
    # left, not an unreachable upstream.
    if _caused_by(failure.value, defer.CancelledError):
        return Failure(defer.CancelledError())
    proxy_failed = _cause(failure.value, ProxyFailed)  # a tunnel's failure arrives wrapped by the Agent
    if proxy_failed is not None:
        return Failure(proxy_failed)
    if _caused_by(failure.value, (TLSError, CertificateNameMismatch)):
        reason = "the TLS handshake failed (certificate not trusted or wrong host)"
    elif failure.check(error.ConnectError, error.TimeoutError, error.DNSLookupError):
        reason = f"could not connect ({why_not_connected(failure.value)})"
    elif failure.check(ResponseFailed, ResponseNeverReceived, RequestTransmissionFailed, RequestNotSent,
                       error.ConnectionLost, error.ConnectionDone):
        reason = CUT
    else:
        return failure
    return Failure(UpstreamFailed(reason))


def _caused_by(exc: BaseException, kind: type | tuple[type, ...]) -> bool:
    return _cause(exc, kind) is not None


def _cause(exc: BaseException, kind: type | tuple[type, ...]):
    """``exc``, or the first of the failures it wraps (ResponseNeverReceived's ``reasons``), that is a ``kind``."""
    if isinstance(exc, kind):
        return exc
    for reason in getattr(exc, "reasons", ()):
        found = _cause(reason.value, kind)
        if found is not None:
            return found
    return None
