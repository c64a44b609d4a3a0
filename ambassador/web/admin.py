"""The admin listener: liveness, readiness, the outside services' state and Prometheus metrics,
apart from the proxy.

It proxies nothing and shows no credential: readiness names what is missing
(a variable, a file path), never a value.
"""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from ambassador.app.health import Health
from ambassador.web.limits import LimitedSite
from ambassador.metrics import Metrics
from ambassador.problems import PROBLEM_CONTENT_TYPE, Problem, not_found


def write_problem(request, problem: Problem) -> None:
    body = problem.body(instance=request.path.decode("latin-1"))
    request.setResponseCode(problem.status)
    request.setHeader(b"content-type", PROBLEM_CONTENT_TYPE)
    for name, value in problem.headers:
        request.setHeader(name, value)
    request.setHeader(b"content-length", b"%d" % len(body))
    request.write(body)
    request.finish()


class _NotFound(Resource):
    isLeaf = True

    def render(self, request):
        write_problem(request, not_found())
        return NOT_DONE_YET


class _Root(Resource):
    """The admin endpoints; anything else is a 404 problem."""

    def getChild(self, path, request):
        return _NotFound()

    def render(self, request):
        return _NotFound().render(request)


class _Leaf(Resource):
    isLeaf = True

    def render(self, request):
        if request.method not in (b"GET", b"HEAD"):
            write_problem(request, Problem(405, "method-not-allowed", "Method not allowed",
                                           "The admin endpoints answer GET and HEAD only.",
                                           headers=[("Allow", "GET, HEAD")]))
            return NOT_DONE_YET
        return self.render_GET(request)


class Liveness(_Leaf):
    """200 while the process can serve: answering means the reactor turns, and every listener
    must still be listening (a lost one is not coming back: restart the container)."""

    def __init__(self, health: Health) -> None:
        super().__init__()
        self._health = health

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        lost = self._health.lost()
        if lost:
            request.setResponseCode(503)
            return f"not listening: {', '.join(lost)}\n".encode()
        return b"ok\n"


def _json(request, document: dict, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(document, indent=1).encode() + b"\n"


class UpstreamsResource(_Leaf):
    """The outside services as the pipeline last saw them: always 200, never readiness."""

    def __init__(self, health: Health) -> None:
        super().__init__()
        self._health = health

    def render_GET(self, request):
        return _json(request, self._health.upstreams())


class ReadinessResource(_Leaf):
    def __init__(self, health: Health, workers=None) -> None:
        super().__init__()
        self._health = health
        self._workers = workers

    def render_GET(self, request):
        report = self._health.report()
        if self._workers is not None:  # --workers: every one must be running
            missing = self._workers.missing()
            report["workers"] = {"count": self._workers.count, "not_running": missing}
            if missing:
                report["ready"] = False
        return _json(request, report, 200 if report["ready"] else 503)


class MetricsResource(_Leaf):
    def __init__(self, metrics: Metrics, workers=None) -> None:
        super().__init__()
        self._metrics = metrics
        self._workers = workers

    def render_GET(self, request):
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        own, content_type = self._metrics.exposition_for(accept)  # OpenMetrics if asked for, else text
        request.setHeader(b"content-type", content_type.encode())
        if self._workers is None:
            return own
        gathered = self._workers.gather_metrics(own, accept)  # --workers: every process's

        gone = []

        def write(exposition: bytes) -> None:
            if not gone:  # the workers' answers may land after the scraper hung up
                request.setHeader(b"content-length", b"%d" % len(exposition))
                request.write(exposition)
                request.finish()

        def left(_) -> None:
            gone.append(True)
            gathered.cancel()

        gathered.addCallback(write).addErrback(lambda failure: failure.trap(defer.CancelledError))
        request.notifyFinish().addErrback(left)
        return NOT_DONE_YET


class AdminSite(LimitedSite):
    """Listens beyond loopback, so it keeps to the same inbound limits as the proxy.
    Probes hit it every few seconds: it stays out of the access log."""

    noisy = False

    def log(self, request) -> None:
        pass


def admin_site(health: Health, metrics: Metrics, *, workers=None) -> AdminSite:
    """``workers``: the primary's WorkerPool with --workers (readiness and metrics cover them all)."""
    root = _Root()
    root.putChild(b"healthz", Liveness(health))
    root.putChild(b"readyz", ReadinessResource(health, workers))
    root.putChild(b"upstreams", UpstreamsResource(health))
    root.putChild(b"metrics", MetricsResource(metrics, workers))
    return AdminSite(root)
