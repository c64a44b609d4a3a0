"""The inbound side: mount each adapter's routes in a twisted.web Resource tree and answer.

This module knows adapters only through IExternalAdapter. Everything it says
itself is problem+json; every request gets one structured access-log event.
"""

from __future__ import annotations

import re
import uuid
from typing import Iterable
from urllib.parse import parse_qsl

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from .exchange import Answer, InboundRequest, Route, Trace
from .interfaces import ConfigurationError, IExternalAdapter
from .metrics import Metrics, RouteMetrics
from .problems import PROBLEM_CONTENT_TYPE, Problem, not_found
from .upstream import Gateway

log = Logger(namespace="ambassador")
access_log = Logger(namespace="ambassador.access")

# A path segment an adapter may forward: no percent-encoding, slashes,
# backslashes, control characters or anything else that could change the
# meaning of the upstream path.
_PLAIN_SEGMENT = re.compile(rb"[A-Za-z0-9_.,:~-]+\Z")
# A caller's X-Request-ID is reused only if it cannot upset a log line or a header.
_ACCEPTABLE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,128}\Z")


def write_problem(request, problem: Problem) -> None:
    request.ambassador_problem = problem.kind
    body = problem.body(instance=request.path.decode("latin-1"), request_id=getattr(request, "ambassador_id", None))
    request.setResponseCode(problem.status)
    request.setHeader(b"content-type", PROBLEM_CONTENT_TYPE)
    for name, value in problem.headers:
        request.setHeader(name, value)
    request.setHeader(b"content-length", b"%d" % len(body))
    request.write(body)
    request.finish()


class ProblemResource(Resource):
    """Answers every request with one problem (used for paths no route serves)."""

    isLeaf = True

    def __init__(self, make_problem=not_found) -> None:
        super().__init__()
        self._make_problem = make_problem

    def render(self, request):
        write_problem(request, self._make_problem())
        return NOT_DONE_YET


class MountNode(Resource):
    """An inner node of the mount tree: unknown children and the node itself are 404."""

    def getChild(self, path, request):
        return ProblemResource()

    def render(self, request):
        write_problem(request, not_found())
        return NOT_DONE_YET


class RouteResource(Resource):
    """One adapter route: checks the request, runs it through the gateway, writes the answer."""

    isLeaf = True

    def __init__(self, adapter: IExternalAdapter, route: Route, gateway: Gateway, metrics: RouteMetrics) -> None:
        super().__init__()
        self.adapter = adapter
        self.route = route
        self.gateway = gateway
        self.metrics = metrics
        self._allow = ", ".join(route.methods)

    def render(self, request):
        request.ambassador_route = self
        request.ambassador_trace = trace = Trace()
        self.metrics.in_flight.inc()
        request.notifyFinish().addBoth(lambda _: self.metrics.in_flight.dec())
        try:
            inbound = self._inbound(request)
        except Problem as problem:
            write_problem(request, problem)
            return NOT_DONE_YET
        answer = self.gateway.answer(self.adapter, inbound, trace)
        request.notifyFinish().addErrback(lambda _: answer.cancel())
        answer.addCallbacks(self._write_answer, self._write_failure, (request,), None, (request,))
        return NOT_DONE_YET

    def _inbound(self, request) -> InboundRequest:
        method = request.method.decode("ascii")
        if method not in self.route.methods:
            raise Problem(
                405,
                "method-not-allowed",
                "Method not allowed",
                f"{self.route.path} answers {self._allow} only.",
                headers=[("Allow", self._allow)],
            )
        raw = request.path[1:].split(b"/")[len(request.prepath) :]
        if raw and raw[-1] == b"":
            raw.pop()  # one trailing slash means the same path
        if raw and not self.route.prefix:
            raise not_found()
        for segment in raw:
            if not _PLAIN_SEGMENT.match(segment) or segment in (b".", b".."):
                raise Problem(
                    400,
                    "bad-path",
                    "Path not forwarded",
                    "Path segments may hold only letters, digits and _ . , : ~ - "
                    "(no percent-encoding, empty segments, '.' or '..').",
                )
        _, _, query = request.uri.partition(b"?")
        try:
            pairs = tuple(parse_qsl(query.decode("utf-8"), keep_blank_values=True, errors="strict"))
        except (UnicodeDecodeError, ValueError):
            raise Problem(400, "bad-query", "Query not understood", "The query string is not valid UTF-8 form data.")
        headers = {
            name.decode("latin-1").lower(): values[0].decode("latin-1")
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        return InboundRequest(
            method=method,
            route=self.route,
            segments=tuple(s.decode("ascii") for s in raw),
            query=pairs,
            headers=headers,
            request_id=request.ambassador_id,
            body=request.content.read(),
        )

    def _write_answer(self, answer: Answer, request) -> None:
        if request.finished or request._disconnected:
            return
        request.setResponseCode(answer.status)
        for name, value in answer.headers:
            request.setHeader(name, value)
        request.setHeader(b"content-length", b"%d" % len(answer.body))
        request.write(answer.body)
        request.finish()

    def _write_failure(self, failure, request) -> None:
        if failure.check(defer.CancelledError) or request._disconnected:
            return
        if failure.check(Problem):
            problem = failure.value
        else:
            log.error(
                "Unexpected error answering {route} (request {request_id}): {error}",
                route=self.route.name,
                request_id=request.ambassador_id,
                error=self.adapter.credential.redact(f"{failure.type.__name__}: {failure.value}"),
            )
            problem = Problem(500, "internal-error", "Internal error",
                              "The ambassador failed unexpectedly; the error is logged.")
        write_problem(request, problem)


def build_root(adapters: Iterable[IExternalAdapter], gateway: Gateway, metrics: Metrics) -> Resource:
    """The Resource tree with every route of every adapter at its mount path."""
    root = MountNode()
    claimed: dict[str, str] = {}
    for adapter in adapters:
        for route in adapter.routes:
            segments = [s for s in route.path.strip("/").split("/") if s]
            if not segments:
                raise ConfigurationError(f"{adapter.name} route {route.name!r}: cannot mount at '/'")
            owner = f"{adapter.name} ({route.name})"
            if route.path.rstrip("/") in claimed:
                raise ConfigurationError(
                    f"{owner} and {claimed[route.path.rstrip('/')]} are both mounted at {route.path}"
                )
            claimed[route.path.rstrip("/")] = owner
            node = root
            for segment in segments[:-1]:
                key = segment.encode()
                child = node.children.get(key)
                if child is None:
                    child = node.children[key] = MountNode()
                elif isinstance(child, RouteResource):
                    raise ConfigurationError(f"{owner} at {route.path} is inside {child.route.path}")
                node = child
            key = segments[-1].encode()
            if key in node.children:
                raise ConfigurationError(f"{owner} at {route.path} would hide other routes below it")
            node.putChild(key, RouteResource(adapter, route, gateway, metrics.route(adapter.name, route.name)))
    return root


def _redacted_uri(request, secret_params: frozenset[str]) -> str:
    path, _, query = request.uri.partition(b"?")
    text = path.decode("latin-1")
    if not query:
        return text
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    shown = "&".join(f"{k}={'[REDACTED]' if k.lower() in secret_params else v}" for k, v in pairs)
    return f"{text}?{shown}"


def _request_id(request) -> str:
    offered = request.getHeader(b"x-request-id")
    if offered is not None and _ACCEPTABLE_REQUEST_ID.match(offered):
        return offered.decode("ascii")
    return uuid.uuid4().hex


class AmbassadorSite(Site):
    """A Site that gives every request an id and one structured, redacted access-log event."""

    displayTracebacks = False

    def __init__(self, resource, clock, metrics: Metrics, **kwargs) -> None:
        super().__init__(resource, **kwargs)
        self._clock = clock
        self._unmatched = metrics.route("", "unmatched")
        self._in_flight: set = set()
        self._drained: defer.Deferred | None = None

    def drain(self, grace_period: float) -> defer.Deferred:
        """Fires when no request is in flight, or after ``grace_period`` seconds, whichever is first."""
        log.info("Draining {count} requests in flight (up to {grace} s)", count=len(self._in_flight),
                 grace=grace_period)
        self._drained = defer.Deferred()
        self._drained.addTimeout(grace_period, self._clock)
        self._drained.addErrback(lambda _: log.warn("Grace period over with {count} requests unfinished",
                                                    count=len(self._in_flight)))
        self._check_drained(None)
        return self._drained

    def _check_drained(self, request) -> None:
        self._in_flight.discard(request)
        if not self._in_flight and self._drained is not None and not self._drained.called:
            self._drained.callback(None)

    def getResourceFor(self, request):
        self._in_flight.add(request)
        request.notifyFinish().addBoth(lambda _: self._check_drained(request))
        request.ambassador_started = self._clock.seconds()
        request.ambassador_id = _request_id(request)
        request.setHeader(b"x-request-id", request.ambassador_id)
        return super().getResourceFor(request)

    def log(self, request) -> None:
        route_resource = getattr(request, "ambassador_route", None)
        trace = getattr(request, "ambassador_trace", None) or Trace()
        started = getattr(request, "ambassador_started", None)
        duration = 0.0 if started is None else self._clock.seconds() - started
        if route_resource is None:
            adapter, route, secret_params, metrics = None, None, frozenset(), self._unmatched
        else:
            adapter, route = route_resource.adapter.name, route_resource.route.name
            secret_params, metrics = route_resource.adapter.secret_params, route_resource.metrics
        metrics.answered(request.code, duration)
        access_log.info(
            "{method} {path} {status} {duration_ms}ms adapter={adapter} route={route} "
            "upstream={upstream_status} attempts={attempts} cache={cache} id={request_id}",
            request_id=getattr(request, "ambassador_id", None),
            method=request.method.decode("latin-1"),
            path=_redacted_uri(request, secret_params),
            status=request.code,
            adapter=adapter,
            route=route,
            upstream_status=trace.upstream_status,
            attempts=trace.attempts,
            cache=trace.cache,
            problem=getattr(request, "ambassador_problem", None),
            duration_ms=round(duration * 1000, 1),
        )
