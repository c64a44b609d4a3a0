"""The process's one HTTP client for upstream calls.

Contract (what the pipeline relies on): ``UpstreamClient.fetch(base_url,
request, max_body=...)`` returns a Deferred that fires with an
``UpstreamResponse`` holding the whole answer, or fails with exactly one of

- ``ResponseTooLarge(limit)``: the answer held more than ``max_body`` bytes
  (the connection is dropped at the cap);
- ``UpstreamFailed(reason)``: no complete answer arrived (could not connect,
  TLS refused, connection lost or cut short); ``reason`` is a phrase for a
  problem's detail, never a secret;
- ``CancelledError``: the Deferred was cancelled (caller left, timeout).
"""

from __future__ import annotations

from http.cookiejar import DefaultCookiePolicy
from urllib.parse import urlencode

import treq
from OpenSSL.SSL import Error as TLSError
from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet import defer, error
from twisted.python.failure import Failure
from twisted.web._newclient import _WrapperException
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http_headers import Headers

from ambassador import __version__
from ambassador.exchange import UpstreamRequest, UpstreamResponse
from ambassador.pipeline.http1client import LEAN_METHODS, ConnectionPool, ResponseTooLarge

__all__ = ["DEFAULT_MAX_RESPONSE_BYTES", "USER_AGENT", "ResponseTooLarge", "UpstreamClient", "UpstreamFailed"]

USER_AGENT = f"ambassador/{__version__}"
#: The most an upstream answer may hold unless the adapter sets ``max_response_bytes``.
DEFAULT_MAX_RESPONSE_BYTES = 10 * 1024 * 1024


class _QuietClientFactory(_HTTP11ClientFactory):
    # Twisted logs "Starting factory" for every new upstream connection otherwise.
    noisy = False


class UpstreamFailed(Exception):
    """No complete answer came from the upstream; the argument says why, in words for a problem's detail."""

    @property
    def reason(self) -> str:
        return self.args[0]


class UpstreamClient:
    """The process's HTTP client, shared by every adapter.

    GET and HEAD without a body (every proxied request) go through the lean
    client in ``ambassador.pipeline.http1client``, over its own kept-alive pool; anything
    else (OAuth2 token requests, bodies) through one treq HTTPClient over a
    persistent Agent pool. Each pool keeps up to ``max_idle_per_host`` idle
    connections per upstream (Twisted's default of 2 would reconnect under
    any real concurrency). HTTPS is verified against the system trust store
    (Agent's default policy) on both.
    """

    def __init__(
        self,
        reactor,
        *,
        connect_timeout: float = 3.0,
        max_idle_per_host: int = 1024,
        idle_timeout: float = 60.0,
    ) -> None:
        self._lean = ConnectionPool(reactor, connect_timeout=connect_timeout, max_idle_per_origin=max_idle_per_host,
                                    idle_timeout=idle_timeout, user_agent=USER_AGENT)
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = max_idle_per_host
        self._pool.cachedConnectionTimeout = idle_timeout
        self._pool._factory = _QuietClientFactory
        # A cookie jar that keeps nothing: an upstream's cookies must not follow one caller's request into
        # every later one (treq would otherwise store them and send them back).
        nothing = IndexableCookieJar(DefaultCookiePolicy(allowed_domains=[]))
        self._http = HTTPClient(Agent(reactor, connectTimeout=connect_timeout, pool=self._pool), cookiejar=nothing)

    def fetch(self, base_url: str, request: UpstreamRequest, *,
              max_body: int = DEFAULT_MAX_RESPONSE_BYTES) -> defer.Deferred:
        """A Deferred firing with the UpstreamResponse; cancelling it drops the request."""
        if request.body is None and request.method in LEAN_METHODS:
            call = self._lean.request(base_url, request, max_body)
        else:
            call = defer.ensureDeferred(self._fetch_with_treq(base_url, request, max_body))
        return call.addErrback(_as_contracted)

    async def _fetch_with_treq(self, base_url: str, request: UpstreamRequest, max_body: int) -> UpstreamResponse:
        url = base_url + request.path
        if request.query:
            url += "?" + urlencode(request.query)
        headers = Headers({"User-Agent": [USER_AGENT]})
        for name, value in request.headers.items():
            headers.setRawHeaders(name, [value])
        # Never follow redirects: a Location may point elsewhere and we would send the credential.
        response = await self._http.request(
            request.method, url, headers=headers, data=request.body, allow_redirects=False
        )
        body = await _read_body(response, max_body)
        return UpstreamResponse(
            status=response.code,
            headers={
                name.decode("latin-1").lower(): b", ".join(values).decode("latin-1")
                for name, values in response.headers.getAllRawHeaders()
            },
            body=body,
        )

    def close(self) -> defer.Deferred:
        return defer.gatherResults([self._pool.closeCachedConnections(), self._lean.close()])


async def _read_body(response, limit: int) -> bytes:
    chunks, size = [], 0

    def keep(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > limit:
            raise ResponseTooLarge(limit)  # treq then drops the connection
        chunks.append(data)

    await treq.collect(response, keep)
    return b"".join(chunks)




def _as_contracted(failure: Failure) -> Failure:
    """A failure of the call as one of the contract's three kinds (anything else passes unchanged)."""
    if failure.check(defer.CancelledError, ResponseTooLarge, UpstreamFailed):
        return failure
    # treq reports a cancelled request as ResponseNeverReceived wrapping CancelledError: a caller who
    # left, not an unreachable upstream.
    if _caused_by(failure.value, defer.CancelledError):
        return Failure(defer.CancelledError())
    if _caused_by(failure.value, TLSError):
        reason = "the TLS handshake failed (certificate not trusted or wrong host)"
    elif failure.check(error.ConnectError, error.TimeoutError, error.DNSLookupError):
        reason = f"could not connect ({_describe(failure.value)})"
    elif failure.check(_WrapperException, error.ConnectionLost, error.ConnectionDone):
        reason = "the connection failed before a complete answer arrived"
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
