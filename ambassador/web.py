"""The inbound side: mount each adapter's routes in a twisted.web Resource tree and answer.

This module knows adapters only through IExternalAdapter. Everything it says
itself is problem+json; every request gets one structured access-log event.
"""

from __future__ import annotations

import hmac
import re
import os
from typing import Iterable
from urllib.parse import parse_qsl

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from .answers import hop_by_hop
from .credentials import FileSecret
from .exchange import Answer, InboundRequest, Route, Trace
from .interfaces import ConfigurationError, IExternalAdapter
from .limits import InboundLimits, LimitedSite
from .metrics import Metrics, RouteMetrics
from .problems import PROBLEM_CONTENT_TYPE, Problem, not_found
from .upstream import Gateway

log = Logger(namespace="ambassador")
access_log = Logger(namespace="ambassador.access")

# A path segment the ambassador accepts: no percent-encoding, slashes,
# backslashes, control characters or anything else that could change the
# meaning of the upstream path.
_PLAIN_SEGMENT = re.compile(rb"[A-Za-z0-9_.,:~-]+\Z")
# Query names and values (decoded) may not hold control characters.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Caller headers no adapter ever sees, so none can be forwarded upstream by mistake:
# the caller's credentials and cookies, the ambassador's own token, and what
# describes the hop between caller and ambassador (with Proxy-*, X-Forwarded-*
# and the hop-by-hop headers).
_CALLER_ONLY_HEADERS = frozenset({"authorization", "cookie", "host", "forwarded", "x-real-ip", "content-length"})
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
        request.ambassador_route = self  # the site's one finish notification counts it out, cancels the answer
        request.ambassador_trace = trace = Trace()
        self.metrics.in_flight.inc()
        try:
            inbound = self._inbound(request)
        except Problem as problem:
            write_problem(request, problem)
            return NOT_DONE_YET
        request.ambassador_answer = answer = self.gateway.answer(self.adapter, inbound, trace)
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
        _, _, query = request.uri.partition(b"?")
        try:
            pairs = tuple(parse_qsl(query.decode("utf-8"), keep_blank_values=True, errors="strict"))
        except (UnicodeDecodeError, ValueError):
            pairs = None
        if pairs is None or any(_CONTROL.search(name + value) for name, value in pairs):
            raise Problem(400, "bad-query", "Query not understood",
                          "The query string is not valid UTF-8 form data without control characters.")
        headers = {
            name.decode("latin-1").lower(): values[0].decode("latin-1")
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        hidden = _CALLER_ONLY_HEADERS | hop_by_hop(headers)
        headers = {name: value for name, value in headers.items()
                   if name not in hidden and not name.startswith(("proxy-", "x-forwarded-"))}
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
        if answer.status != 304:  # a 304's Content-Length would describe the body it leaves out
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


def build_root(adapters: Iterable[IExternalAdapter], gateway: Gateway, metrics: Metrics) -> Resource:
    """The Resource tree with every route of every adapter at its mount path."""
    root = MountNode()
    for segments, (adapter, route) in mount_table(adapters).items():
        node = root
        for segment in segments[:-1]:
            node = node.children.setdefault(segment.encode(), MountNode())
        resource = RouteResource(adapter, route, gateway, metrics.route(adapter.name, route.name))
        node.putChild(segments[-1].encode(), resource)
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
    return os.urandom(16).hex()  # as random as uuid4().hex, for a third of the cost


def _path_problem(request) -> Problem | None:
    """Why the request target may not be served, or None: origin-form (``/a/b?q``) with plain segments only."""
    if not request.uri.startswith(b"/") or request.uri.startswith(b"//"):
        return Problem(400, "bad-target", "Request target not served",
                       "The ambassador serves paths such as /movies; it is not a forward proxy "
                       "(no absolute URLs, CONNECT, '*' or '//').")
    segments = request.path[1:].split(b"/")
    if segments[-1] == b"":
        segments.pop()  # one trailing slash means the same path
    if any(not _PLAIN_SEGMENT.match(s) or s in (b".", b"..") for s in segments):
        return Problem(400, "bad-path", "Path not forwarded",
                       "Path segments may hold only letters, digits and _ . , : ~ - "
                       "(no percent-encoding, empty segments, '.' or '..').")
    return None


class AmbassadorSite(LimitedSite):
    """The proxy Site: inbound limits, an optional caller token, and for every request an id
    and one structured, redacted access-log event."""

    def __init__(self, resource, clock, metrics: Metrics, *, limits: InboundLimits = InboundLimits(),
                 token: FileSecret | None = None) -> None:
        super().__init__(resource, limits=limits, reactor=clock)
        self._clock = clock
        self._unmatched = metrics.route("", "unmatched")
        self._token = token
        self._in_flight: set = set()
        self._drained: defer.Deferred | None = None

    def startFactory(self) -> None:
        super().startFactory()
        if self._token is not None:
            self._token.start(self._clock)

    def stopFactory(self) -> None:
        if self._token is not None:
            self._token.stop()
        super().stopFactory()

    def refused(self, problem: Problem, request_id: str) -> None:
        self._unmatched.answered(problem.status, 0.0)
        super().refused(problem, request_id)

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

    def _finished(self, result, request) -> None:
        """The one notification of a request's end (answered, or the caller went away)."""
        route = getattr(request, "ambassador_route", None)
        if route is not None:
            route.metrics.in_flight.dec()
            answer = getattr(request, "ambassador_answer", None)
            if answer is not None and isinstance(result, Failure):
                answer.cancel()  # the caller is gone: so is our interest in the upstream
        self._check_drained(request)

    def _check_drained(self, request) -> None:
        self._in_flight.discard(request)
        if not self._in_flight and self._drained is not None and not self._drained.called:
            self._drained.callback(None)

    def getResourceFor(self, request):
        self._in_flight.add(request)
        request.notifyFinish().addBoth(self._finished, request)
        request.ambassador_started = self._clock.seconds()
        request.ambassador_id = _request_id(request)
        request.setHeader(b"x-request-id", request.ambassador_id)
        resource = super().getResourceFor(request)  # only looks children up
        problem = self._unauthorized(request) or _path_problem(request)
        return resource if problem is None else ProblemResource(lambda: problem)

    def _unauthorized(self, request) -> Problem | None:
        if self._token is None:
            return None
        expected = self._token.current()
        offered = request.getHeader(b"authorization") or b""
        if expected is not None and hmac.compare_digest(offered, b"Bearer " + expected.encode()):
            return None
        return Problem(401, "unauthorized", "Token required",
                       "This ambassador requires Authorization: Bearer <token>, with the token it was "
                       "given in --require-token-file.", headers=[("WWW-Authenticate", "Bearer")])

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
