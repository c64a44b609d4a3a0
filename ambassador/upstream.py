"""The upstream pipeline: one HTTP client for the process, and the steps every request takes.

Adapters describe requests; this module executes them: credential, timeout,
the call itself, and the mapping of network failures to problem answers.
"""

from __future__ import annotations

from http.cookiejar import DefaultCookiePolicy
from urllib.parse import urlencode

import treq
from attrs import evolve
from OpenSSL.SSL import Error as TLSError
from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet import defer, error
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web._newclient import _WrapperException
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http_headers import Headers

from . import __version__
from .exchange import InboundRequest, Trace, UpstreamRequest, UpstreamResponse
from .health import Readiness
from .interfaces import IExternalAdapter
from .metrics import Metrics
from .problems import Problem

USER_AGENT = f"ambassador/{__version__}"
#: The most an upstream answer may hold unless the adapter sets ``max_response_bytes``.
DEFAULT_MAX_RESPONSE_BYTES = 10 * 1024 * 1024


class _QuietClientFactory(_HTTP11ClientFactory):
    # Twisted logs "Starting factory" for every new upstream connection otherwise.
    noisy = False


class UpstreamClient:
    """One treq HTTPClient over one persistent connection pool, shared by every adapter.

    The pool keeps up to ``max_idle_per_host`` idle connections per upstream
    (Twisted's default of 2 would reconnect under any real concurrency).
    HTTPS is verified against the system trust store (Agent's default policy).
    """

    def __init__(
        self,
        reactor,
        *,
        connect_timeout: float = 3.0,
        max_idle_per_host: int = 128,
        idle_timeout: float = 60.0,
    ) -> None:
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = max_idle_per_host
        self._pool.cachedConnectionTimeout = idle_timeout
        self._pool._factory = _QuietClientFactory
        # A cookie jar that keeps nothing: an upstream's cookies must not follow one caller's request into
        # every later one (treq would otherwise store them and send them back).
        nothing = IndexableCookieJar(DefaultCookiePolicy(allowed_domains=[]))
        self._http = HTTPClient(Agent(reactor, connectTimeout=connect_timeout, pool=self._pool), cookiejar=nothing)

    async def fetch(self, base_url: str, request: UpstreamRequest, *,
                    max_body: int = DEFAULT_MAX_RESPONSE_BYTES) -> UpstreamResponse:
        url = base_url + request.path
        if request.query:
            url += "?" + urlencode(request.query)
        headers = Headers({"User-Agent": [USER_AGENT]})
        for name, value in request.headers.items():
            headers.setRawHeaders(name, [value])
        # Never follow redirects: a Location may point elsewhere and we would send the credential.
        response = await self._http.request(request.method, url, headers=headers, allow_redirects=False)
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
        return self._pool.closeCachedConnections()


class ResponseTooLarge(Exception):
    """The upstream answer was longer than its adapter's limit; the rest was not read."""


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


class Gateway:
    """Runs one inbound request through an adapter and the upstream pipeline.

    It records each upstream attempt in ``metrics`` and what it learns about
    an adapter's credential in ``readiness``, and fills in the request's Trace.
    """

    def __init__(
        self,
        client: UpstreamClient,
        clock: IReactorTime,
        metrics: Metrics,
        readiness: Readiness,
        *,
        timeout: float = 10.0,
        forward_request_id: frozenset[str] = frozenset(),
    ) -> None:
        self._client = client
        self._clock = clock
        self._metrics = metrics
        self._readiness = readiness
        self.timeout = timeout
        self._forward_request_id = forward_request_id

    def answer(self, adapter: IExternalAdapter, inbound: InboundRequest, trace: Trace) -> defer.Deferred:
        """A Deferred firing with the Answer, or failing with a Problem. Cancel it to abandon."""
        try:
            request = adapter.credential.attach(adapter.upstream_request(inbound), adapter.name)
        except Problem:
            return defer.fail()
        if inbound.request_id and adapter.name in self._forward_request_id:
            request = evolve(request, headers={**request.headers, "X-Request-ID": inbound.request_id})
        call = self._attempt(adapter, request, trace)
        call.addCallback(self._interpret, adapter, inbound)
        return call

    def probe(self, adapter: IExternalAdapter, path: str) -> defer.Deferred:
        """Ask the upstream for ``path``; fires with None when it answered well, else why not."""
        try:
            request = adapter.credential.attach(UpstreamRequest("GET", path), adapter.name)
        except Problem as problem:
            return defer.succeed(problem.detail)
        call = self._attempt(adapter, request, Trace())
        call.addCallbacks(
            lambda response: None if response.status < 400 else f"{path} answered status {response.status}",
            lambda failure: failure.value.detail if failure.check(Problem) else failure.getErrorMessage(),
        )
        return call

    def _attempt(self, adapter: IExternalAdapter, request: UpstreamRequest, trace: Trace) -> defer.Deferred:
        trace.attempts += 1
        started = self._clock.seconds()
        limit = getattr(adapter, "max_response_bytes", DEFAULT_MAX_RESPONSE_BYTES)
        call = defer.ensureDeferred(self._client.fetch(adapter.base_url, request, max_body=limit))
        call.addTimeout(self.timeout, self._clock, onTimeoutCancel=_deadline_passed)
        call.addBoth(self._attempted, adapter, started, trace)
        call.addErrback(self._explain_failure, adapter)
        return call

    def _attempted(self, result, adapter: IExternalAdapter, started: float, trace: Trace):
        if isinstance(result, UpstreamResponse):
            trace.upstream_status = result.status
            outcome = f"{result.status // 100}xx"
        elif result.check(DeadlinePassed):
            outcome = "timeout"
        elif result.check(defer.CancelledError):
            outcome = "cancelled"
        elif result.check(ResponseTooLarge):
            outcome = "too-large"
        else:
            outcome = "unreachable"
        self._metrics.upstream_attempts.labels(adapter.name, outcome).inc()
        self._metrics.upstream_seconds.labels(adapter.name).observe(self._clock.seconds() - started)
        return result

    def _interpret(self, response: UpstreamResponse, adapter: IExternalAdapter, inbound: InboundRequest):
        state = self._readiness[adapter.name]
        try:
            answer = adapter.interpret(inbound, response)
        except Problem as problem:
            if problem.kind == "credential-rejected":
                state.credential_rejected = True
            raise
        if answer.status < 500:
            state.credential_rejected = False  # the upstream took the credential
        return answer

    def _explain_failure(self, failure, adapter: IExternalAdapter):
        failure.trap(Exception)
        where = f"the {adapter.name} service ({_host(adapter.base_url)})"
        if failure.check(DeadlinePassed):
            raise Problem(
                504,
                "upstream-timeout",
                "Upstream timed out",
                f"{where} did not answer completely within {self.timeout:g} s.",
            )
        if failure.check(defer.CancelledError):
            return failure
        if failure.check(ResponseTooLarge):
            raise Problem(502, "upstream-too-large", "Upstream answer too large",
                          f"{where} answered more than {failure.value.args[0]} bytes, "
                          "the most the ambassador reads from it.")
        if _caused_by(failure.value, TLSError):
            reason = "the TLS handshake failed (certificate not trusted or wrong host)"
        elif failure.check(error.ConnectError, error.TimeoutError):
            reason = f"could not connect ({_describe(failure.value)})"
        elif failure.check(_WrapperException, error.ConnectionLost, error.ConnectionDone):
            reason = "the connection failed before a complete answer arrived"
        else:
            return failure
        raise Problem(502, "upstream-unreachable", "Upstream unreachable", f"Calling {where}: {reason}.")


class DeadlinePassed(Exception):
    """The whole upstream exchange took longer than the gateway's timeout."""


def _deadline_passed(result, timeout):
    return Failure(DeadlinePassed())


def _host(base_url: str) -> str:
    return base_url.split("://", 1)[-1]


def _describe(exc: Exception) -> str:
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
