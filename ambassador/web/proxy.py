"""The inbound side: route each request to an adapter's route, run it through the gateway, answer.

The proxy port is a twisted.web Site (a LimitedSite: the limits and refusals of
``ambassador.web.limits``) whose resources are the adapters' routes, each mounted
under its path. This module knows adapters only through IExternalAdapter.
Everything it says itself is problem+json; every request gets one structured
access-log event.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable
from typing import Protocol
from urllib.parse import parse_qsl

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from ambassador.pipeline.answers import HOP_BY_HOP_HEADERS, hop_by_hop
from ambassador.credentials.sources import FileSecret
from ambassador.exchange import Answer, InboundRequest, Route, Trace, resembles_param
from ambassador.interfaces import ConfigurationError, IExternalAdapter
from ambassador.web.limits import InboundLimits, LimitedSite, log_access, new_request_id
from ambassador.metrics import Metrics, RouteMetrics
from ambassador.problems import PROBLEM_CONTENT_TYPE, Problem, not_found
from ambassador.tracing import Tracing

log = Logger(namespace="ambassador")
#: ``--access-log`` choices: the lowest status that gets an access-log event (above any status: none).
ACCESS_LOG_FROM = {"all": 0, "errors": 400, "none": 1000}

# A path the ambassador accepts: segments without percent-encoding, backslashes, control
# characters or anything else that could change the meaning of the upstream path, none
# empty (one trailing slash is allowed). Written so that matching never backtracks.
_PLAIN_PATH = re.compile(rb"/(?:[A-Za-z0-9_.,:~-]+(?:/[A-Za-z0-9_.,:~-]+)*/?)?\Z")
# Query names and values (decoded) may not hold control characters.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Caller headers no adapter ever sees, so none can be forwarded upstream by mistake:
# the caller's credentials and cookies, the ambassador's own token, and what
# describes the hop between caller and ambassador (with Proxy-*, X-Forwarded-*
# and the hop-by-hop headers).
_CALLER_ONLY_HEADERS = frozenset({"authorization", "cookie", "host", "forwarded", "x-real-ip", "content-length",
                                  # the caller's trace context: continued by our span, never passed on as is
                                  "traceparent", "tracestate"})
_HIDDEN = _CALLER_ONLY_HEADERS | HOP_BY_HOP_HEADERS
# A caller's X-Request-ID is reused only if it cannot upset a log line or a header.
_ACCEPTABLE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}\Z")
# nginx's status for a request whose caller closed the connection before the answer.
CLIENT_CLOSED_REQUEST = 499
_NO_BODY_STATUSES = frozenset({204, 304})
_NO_IDS: dict[str, str] = {}  # the access log's trace ids, tracing off


class Answering(Protocol):
    """What a route runs a request through: the Gateway, or a peer's relaying stand-in for it."""

    def answer(self, adapter: IExternalAdapter, inbound: InboundRequest, trace: Trace) -> defer.Deferred: ...


class RouteHandler:
    """One adapter route: checks the request, runs it through the gateway."""

    def __init__(self, adapter: IExternalAdapter, route: Route, gateway: Answering, metrics: RouteMetrics) -> None:
        self.adapter = adapter
        self.route = route
        self.gateway = gateway
        self.metrics = metrics
        self._allow = ", ".join(route.methods)
        #: http.route of its spans: the template, never a caller's path
        self.template = route.path.rstrip("/") + ("/{path}" if route.prefix else "")

    def inbound(self, request, segments: list[bytes]) -> InboundRequest:
        """What the adapter is given; ``segments`` are the (plain) path segments below the mount."""
        method = request.method.decode("ascii")
        if method not in self.route.methods:
            raise Problem(
                405,
                "method-not-allowed",
                "Method not allowed",
                f"{self.route.path} answers {self._allow} only.",
                headers=[("Allow", self._allow)],
            )
        if segments and not self.route.prefix:
            raise not_found()
        pairs: tuple[tuple[str, str], ...] | None
        pairs = ()
        query = request.uri.partition(b"?")[2]
        if query:
            try:
                pairs = tuple(_form_pairs(query.decode("utf-8"), errors="strict"))
            except (UnicodeDecodeError, ValueError):
                pairs = None
            if pairs is None or _CONTROL.search("".join(map("".join, pairs))):  # in any name or value
                raise Problem(400, "bad-query", "Query not understood",
                              "The query string is not valid UTF-8 form data without control characters.")
        given = request.headers
        hidden = _CALLER_ONLY_HEADERS | hop_by_hop(given) if "connection" in given else _HIDDEN
        headers = {name: value for name, value in given.items()
                   if name not in hidden and not name.startswith(("proxy-", "x-forwarded-"))}
        return InboundRequest(
            method=method,
            route=self.route,
            segments=tuple(s.decode("ascii") for s in segments) if segments else (),
            query=pairs,
            headers=headers,
            request_id=request.id,
            body=request.content.getvalue(),
        )


class _RouteResource(Resource):
    """Where a route is mounted: everything below it is the route's (a prefix route's segments)."""

    isLeaf = True

    def __init__(self, handler: RouteHandler) -> None:
        super().__init__()
        self.handler = handler

    def render(self, request):
        segments = request.postpath
        if segments and segments[-1] == b"":
            segments = segments[:-1]  # one trailing slash means the same path
        request.site.serve(request, self.handler, segments)
        return NOT_DONE_YET


class _Unrouted(Resource):
    """The root, and a path segment above a mount: not found, unless a child is."""

    def getChild(self, path, request):
        return _ProblemResource(not_found())

    def render(self, request):
        return _ProblemResource(not_found()).render(request)


class _ProblemResource(Resource):
    """Answers ``problem`` whatever lies below (a refused target, a path no route is mounted at)."""

    isLeaf = True

    def __init__(self, problem: Problem) -> None:
        super().__init__()
        self.problem = problem

    def render(self, request):
        request.site.answer_problem(request, self.problem)
        return NOT_DONE_YET


def _resource_tree(routes: dict[tuple[bytes, ...], RouteHandler]) -> Resource:
    root = _Unrouted()
    for segments, handler in routes.items():
        node = root
        for segment in segments[:-1]:
            if segment not in node.children:
                node.putChild(segment, _Unrouted())
            node = node.children[segment]
        node.putChild(segments[-1], _RouteResource(handler))
    return root


def mount_table(adapters: Iterable[IExternalAdapter]) -> dict[tuple[str, ...], tuple[IExternalAdapter, Route]]:
    """Every route of every adapter by its path segments; ConfigurationError when two routes
    share a path or one would hide another below it."""
    table: dict[tuple[str, ...], tuple[IExternalAdapter, Route]] = {}
    for adapter in adapters:
        for route in adapter.routes:
            segments = tuple(s for s in route.path.strip("/").split("/") if s)
            owner = f"{adapter.name} ({route.name})"
            if not segments:
                raise ConfigurationError(f"{owner}: cannot mount at '/'")
            for other, (other_adapter, other_route) in table.items():
                shorter, longer = sorted((segments, other), key=len)
                if longer[: len(shorter)] != shorter:
                    continue
                other_owner = f"{other_adapter.name} ({other_route.name})"
                if shorter == longer:
                    raise ConfigurationError(f"{owner} and {other_owner} are both mounted at {route.path}")
                raise ConfigurationError(f"{owner} at {route.path} and {other_owner} at {other_route.path} "
                                         "overlap: one would hide the other")
            table[segments] = (adapter, route)
    return table


def _form_pairs(query: str, errors: str = "replace") -> list[tuple[str, str]]:
    """``parse_qsl(query, keep_blank_values=True, errors=errors)``, at C speed when nothing is escaped."""
    if "%" in query or "+" in query:
        return parse_qsl(query, keep_blank_values=True, errors=errors)
    return [pair.partition("=")[::2] for pair in query.split("&") if pair]


def _redacted_uri(target: bytes, secret_params: frozenset[str]) -> str:
    path, _, query = target.partition(b"?")
    text = path.decode("latin-1")
    if not query:
        return text
    pairs = _form_pairs(query.decode("latin-1"))
    shown = "&".join(f"{k}={'[REDACTED]' if resembles_param(k, secret_params) else v}" for k, v in pairs)
    return f"{text}?{shown}"


def _headers(request) -> dict[str, str]:
    """Lower-case names and each name's first value (``connection`` gathers all of them)."""
    headers = {}
    for name, values in request.requestHeaders.getAllRawHeaders():
        key = name.decode("latin-1").lower()
        headers[key] = b", ".join(values if key == "connection" else values[:1]).decode("latin-1")
    return headers


def _request_id(headers: dict[str, str]) -> str:
    offered = headers.get("x-request-id")
    if offered is not None and _ACCEPTABLE_REQUEST_ID.match(offered):
        return offered
    return new_request_id()


def _target_problem(target: bytes) -> Problem | None:
    """None when the target is origin-form (``/a/b?q``) with plain segments."""
    if not target.startswith(b"/") or target.startswith(b"//"):
        return Problem(400, "bad-target", "Request target not served",
                       "The ambassador serves paths such as /movies; it is not a forward proxy "
                       "(no absolute URLs, CONNECT, '*' or '//').")
    path = target.partition(b"?")[0]
    segments = path[1:].split(b"/")
    if not _PLAIN_PATH.match(path) or b"." in segments or b".." in segments:
        return Problem(400, "bad-path", "Path not forwarded",
                       "Path segments may hold only letters, digits and _ . , : ~ - "
                       "(no percent-encoding, empty segments, '.' or '..').")
    return None


class ProxyFactory(LimitedSite):
    """The proxy listener (a Site): an optional caller token, the adapters' routes, and for every request
    an id and one structured, redacted access-log event (``access_log``: for every answer, "all";
    for statuses from 400, "errors"; "none")."""

    keeps_http_1_0_alive = True  # every answer is written whole, with its Content-Length (``_finish``)

    def __init__(self, adapters: Iterable[IExternalAdapter], gateway: Answering, metrics: Metrics, clock, *,
                 limits: InboundLimits = InboundLimits(), token: FileSecret | None = None,
                 access_log: str = "all", tracing: Tracing | None = None) -> None:
        self._metrics = metrics
        self._tracing = tracing
        super().__init__(self._tree(adapters, gateway), limits=limits, reactor=clock)
        self.clock = clock
        self._log_from = ACCESS_LOG_FROM[access_log]
        self._unmatched = metrics.route("", "unmatched")
        self._token = token
        self._in_flight: set = set()
        self._drained: defer.Deferred | None = None

    def _tree(self, adapters: Iterable[IExternalAdapter], gateway: Answering) -> Resource:
        routes = {tuple(s.encode() for s in segments): RouteHandler(adapter, route, gateway,
                                                                     self._metrics.route(adapter.name, route.name))
                  for segments, (adapter, route) in mount_table(adapters).items()}
        return _resource_tree(routes)

    def reroute(self, adapters: Iterable[IExternalAdapter], gateway: Answering) -> None:
        """Route new requests to ``adapters`` through ``gateway`` (a reload): the root resource is
        replaced, and a request already routed keeps the handler, so the adapter and gateway, it
        started with."""
        self.resource = self._tree(adapters, gateway)

    def startFactory(self) -> None:
        super().startFactory()
        if self._token is not None:
            self._token.start(self.clock)

    def stopFactory(self) -> None:
        super().stopFactory()
        if self._token is not None:
            self._token.stop()

    def log(self, request) -> None:
        pass  # the access log is ours (redacted, structured): not twisted.web's combined log line

    def refused(self, problem: Problem, request_id: str) -> None:
        self._unmatched.answered(problem.status, 0.0)
        self._metrics.problems.labels("", problem.kind).inc()
        if problem.status < self._log_from:
            return
        log_access(problem.status, "Refused {status} {problem} id={request_id}", problem=problem.kind,
                   request_id=request_id)

    def drain(self, grace_period: float) -> defer.Deferred:
        """Fires when no request is in flight, or after ``grace_period`` seconds, whichever is first."""
        log.info("Draining {count} requests in flight (up to {grace} s)", count=len(self._in_flight),
                 grace=grace_period)
        self.close_connections()  # callers reconnect elsewhere (or to the replacement) instead of waiting
        self._drained = defer.Deferred()
        self._drained.addTimeout(grace_period, self.clock)
        self._drained.addErrback(lambda _: log.warn("Grace period over with {count} requests unfinished",
                                                    count=len(self._in_flight)))
        self._check_drained()
        return self._drained

    def _check_drained(self) -> None:
        if not self._in_flight and self._drained is not None and not self._drained.called:
            self._drained.callback(None)

    def getResourceFor(self, request):
        """Every request read whole comes here first: its id and notes, the target (the token was checked
        from the head, ``refuse_head``)."""
        self._in_flight.add(request)
        request.started = self.clock.seconds()
        request.headers = _headers(request)
        request.id = _request_id(request.headers)
        request.handler = request.answer = request.problem = None
        request.gone = False
        request.trace = Trace()
        if self._tracing is not None:
            request.trace.span = self._tracing.server_span(request.headers, request.method.decode("latin-1"))
        request.notifyFinish().addErrback(self._gone, request)
        resource = super().getResourceFor(request)
        problem = _target_problem(request.uri)
        return resource if problem is None else _ProblemResource(problem)

    def refuse_head(self, request) -> Problem | None:
        """Without the token a request is refused from its head: no byte of its body is read."""
        if self._token is None:
            return None
        expected = self._token.current()
        offered = b",".join(request.requestHeaders.getRawHeaders(b"authorization", []))
        if expected is not None and hmac.compare_digest(offered, b"Bearer " + expected.encode()):
            return None
        return Problem(401, "unauthorized", "Token required",
                       "This ambassador requires Authorization: Bearer <token>, with the token it was "
                       "given in --require-token-file.", headers=[("WWW-Authenticate", "Bearer")])

    def serve(self, request, handler: RouteHandler, segments: list[bytes]) -> None:
        request.handler = handler
        handler.metrics.in_flight.inc()
        if request.trace.span is not None:
            Tracing.routed(request.trace.span, request.method.decode("latin-1"), request.path.decode("latin-1"),
                           handler.template, handler.adapter.name)
        try:
            inbound = handler.inbound(request, segments)
        except Problem as problem:
            self.answer_problem(request, problem)
            return
        request.answer = handler.gateway.answer(handler.adapter, inbound, request.trace)
        request.answer.addCallbacks(self._write_answer, self._write_failure, (request,), None, (request,))

    def _write_answer(self, answer: Answer, request) -> None:
        if not request.gone:
            self._finish(request, answer.status, [("X-Request-ID", request.id), *answer.headers], answer.body)

    def _write_failure(self, failure, request) -> None:
        if request.gone or failure.check(defer.CancelledError):
            return
        if failure.check(Problem):
            problem = failure.value
        else:
            handler = request.handler
            log.error(
                "Unexpected error answering {route} (request {request_id}): {error}",
                route=handler.route.name,
                request_id=request.id,
                error=handler.adapter.credential.redact(f"{failure.type.__name__}: {failure.value}"),
            )
            problem = Problem(500, "internal-error", "Internal error",
                              "The ambassador failed unexpectedly; the error is logged.")
        self.answer_problem(request, problem)

    def answer_problem(self, request, problem: Problem) -> None:
        request.problem = problem.kind
        self._metrics.problems.labels(request.handler.adapter.name if request.handler else "", problem.kind).inc()
        body = problem.body(instance=request.path.decode("latin-1"), request_id=request.id)
        self._finish(request, problem.status,
                     [("X-Request-ID", request.id), ("Content-Type", PROBLEM_CONTENT_TYPE), *problem.headers], body)

    def _finish(self, request, status: int, headers, body: bytes) -> None:
        if request.gone or request.finished:
            return
        request.setResponseCode(status)
        grouped: dict[str, list[str]] = {}
        for name, value in headers:
            if name.lower() not in ("content-length", "connection", "transfer-encoding"):  # framing is ours
                grouped.setdefault(name, []).append(value)
        for name, values in grouped.items():
            request.responseHeaders.setRawHeaders(name, values)  # an answer's own Date replaces ours
        if status not in _NO_BODY_STATUSES:
            request.setHeader(b"content-length", b"%d" % len(body))
        if self.closing:
            request.setHeader(b"connection", b"close")
            request.channel.persistent = False
        request.write(body)
        request.finish()
        self._log(request, status)
        self._done(request)

    def _gone(self, failure, request) -> None:
        if request.finished or request.gone:
            return
        request.gone = True
        if request.answer is not None:
            request.answer.cancel()  # the caller is gone: so is our interest in the upstream
        self._log(request, CLIENT_CLOSED_REQUEST)
        self._done(request)

    def _done(self, request) -> None:
        if request.handler is not None:
            request.handler.metrics.in_flight.dec()
        self._in_flight.discard(request)
        self._check_drained()

    def _log(self, request, status: int) -> None:
        handler, trace = request.handler, request.trace
        duration = self.clock.seconds() - request.started
        if handler is None:
            adapter, route, secret_params, metrics = None, None, frozenset[str](), self._unmatched
        else:
            adapter, route = handler.adapter.name, handler.route.name
            secret_params, metrics = handler.adapter.secret_params, handler.metrics
        metrics.answered(status, duration)
        ids = _NO_IDS
        if trace.span is not None and self._tracing is not None:
            self._tracing.answered(trace.span, status, trace.cache, request.problem)
            ids = Tracing.log_ids(trace.span)
        if status < self._log_from:  # the access line costs about a third of a cache hit's CPU
            return
        log_access(
            status,
            "{method} {path} {status} {duration_ms}ms adapter={adapter} route={route} "
            "upstream={upstream_status} attempts={attempts} cache={cache} id={request_id}",
            request_id=request.id,
            method=request.method.decode("latin-1"),
            path=_redacted_uri(request.uri, secret_params),
            adapter=adapter,
            route=route,
            upstream_status=trace.upstream_status,
            attempts=trace.attempts,
            cache=trace.cache,
            problem=request.problem,
            duration_ms=round(duration * 1000, 1),
            **ids,
        )
