"""The upstream pipeline: one HTTP client for the process, and the steps every request takes.

Adapters describe requests; this module executes them: credential, timeout,
the call itself, and the mapping of network failures to problem answers.
"""

from __future__ import annotations

from urllib.parse import urlencode

from attrs import evolve
from OpenSSL.SSL import Error as TLSError
from treq.client import HTTPClient
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
        self._http = HTTPClient(Agent(reactor, connectTimeout=connect_timeout, pool=self._pool))

    async def fetch(self, base_url: str, request: UpstreamRequest) -> UpstreamResponse:
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
        body = await response.content()
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
            request = adapter.upstream_request(inbound)
        except Problem:
            return defer.fail()
        if inbound.request_id and adapter.name in self._forward_request_id:
            request = evolve(request, headers={**request.headers, "X-Request-ID": inbound.request_id})
        call = self._authenticated(adapter, request, trace)
        call.addCallback(self._interpret, adapter, inbound)
        return call

    def probe(self, adapter: IExternalAdapter, path: str) -> defer.Deferred:
        """Ask the upstream for ``path``; fires with None when it answered well, else why not."""
        call = self._authenticated(adapter, UpstreamRequest("GET", path), Trace())
        call.addCallbacks(
            lambda response: None if response.status < 400 else f"{path} answered status {response.status}",
            lambda failure: failure.value.detail if failure.check(Problem) else failure.getErrorMessage(),
        )
        return call

    # The credential: attached per attempt (it may first fetch an OAuth2 token, so it may be a
    # Deferred); a 401 to a credential that can be refreshed is retried once with a fresh one.

    def _authenticated(
        self, adapter: IExternalAdapter, request: UpstreamRequest, trace: Trace, *, retry_rejected: bool = True
    ) -> defer.Deferred:
        """A Deferred firing with the UpstreamResponse to ``request`` sent with the adapter's credential."""
        call = defer.maybeDeferred(adapter.credential.attach, request, adapter.name)
        call.addCallback(lambda sent: self._attempt(adapter, sent, trace).addCallback(
            self._unless_rejected, adapter, request, sent, trace, retry_rejected))
        return call

    def _unless_rejected(self, response: UpstreamResponse, adapter: IExternalAdapter, request: UpstreamRequest,
                         sent: UpstreamRequest, trace: Trace, retry_rejected: bool):
        if response.status == 401 and retry_rejected and adapter.credential.rejected(sent):
            return self._authenticated(adapter, request, trace, retry_rejected=False)
        return response

    def _timeout(self, adapter: IExternalAdapter) -> float:
        return getattr(adapter, "timeout", None) or self.timeout

    def _attempt(self, adapter: IExternalAdapter, request: UpstreamRequest, trace: Trace) -> defer.Deferred:
        trace.attempts += 1
        started = self._clock.seconds()
        call = defer.ensureDeferred(self._client.fetch(adapter.base_url, request))
        call.addTimeout(self._timeout(adapter), self._clock, onTimeoutCancel=_deadline_passed)
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
                f"{where} did not answer completely within {self._timeout(adapter):g} s.",
            )
        if failure.check(defer.CancelledError):
            return failure
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
