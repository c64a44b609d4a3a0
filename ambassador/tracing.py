"""OpenTelemetry tracing: a SERVER span per inbound request, a CLIENT span per upstream attempt.

Off unless the standard variables name an OTLP endpoint (``tracing_wanted``); off, nothing of the
SDK is imported or built and a request costs one ``is None`` check where a span would start. On,
the SDK does what its variables say (``OTEL_SERVICE_NAME``, ``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``,
``OTEL_EXPORTER_OTLP_*``): it reads them itself, nothing here re-implements them. Spans are exported
over OTLP/HTTP by the SDK's ``BatchSpanProcessor``, in its own thread with its own HTTP client:
never on the reactor.

OTel's "current span" is a contextvar, which Deferred callbacks do not carry across an ``await``:
nothing here relies on it. The server span rides on the request's ``Trace`` and parents each
client span explicitly (``trace.set_span_in_context``).

What a span holds is chosen here, in one place: methods, the route template, statuses, the
upstream's host and path, the cache outcome and the problem kind. Never a query, a header or
anything a credential is in (docs/security.md says what a collector sees).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

from twisted.logger import Logger

from ambassador.interfaces import ConfigurationError

log = Logger(namespace="ambassador.tracing")

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
#: For --help: the variables that turn tracing on and shape it (the SDK reads them).
TRACING_HELP = {
    "OTEL_EXPORTER_OTLP_ENDPOINT": "turns tracing on: the OTLP/HTTP collector (spans go to its /v1/traces)",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "turns tracing on: the full URL spans are posted to",
    "OTEL_SERVICE_NAME": "the service.name of the spans (default ambassador)",
    "OTEL_TRACES_SAMPLER": "and OTEL_TRACES_SAMPLER_ARG: which traces are kept (default parentbased_always_on)",
    "OTEL_BSP_*": "the batch exporter's delay, queue and batch sizes, timeout",
    "OTEL_SDK_DISABLED": "true, or OTEL_TRACES_EXPORTER=none: tracing off whatever else is set",
}
#: Seconds the spans still queued at SIGTERM may take to reach the collector, after the drain.
SHUTDOWN_BOUND = 3.0
# http.request.method: the known methods, anything else as "_OTHER" (a caller's token never names a span).
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})


def tracing_wanted(environ: Mapping[str, str]) -> bool:
    """Whether the environment turns tracing on. ConfigurationError for a value the ambassador cannot
    work with: it names the variable and what was expected, never what it holds (an endpoint URL
    may carry credentials)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = {e.strip().lower() for e in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()}
    if "none" in exporters:
        return False
    endpoints = [name for name in ENDPOINT_VARIABLES if environ.get(name, "").strip()]
    if not endpoints:
        return False
    if exporters - {"otlp"}:
        raise ConfigurationError("OTEL_TRACES_EXPORTER: expected otlp or none (the ambassador exports spans "
                                 "over OTLP/HTTP only)")
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = environ.get(name, "").strip()
        if protocol:
            if protocol != "http/protobuf":
                raise ConfigurationError(f"{name}: expected http/protobuf (the ambassador exports spans over "
                                         "OTLP/HTTP only)")
            break
    for name in endpoints:
        try:
            parts = urlsplit(environ[name].strip())
            valid = parts.scheme in ("http", "https") and bool(parts.hostname)
            parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
        except ValueError:
            valid = False
        if not valid:
            raise ConfigurationError(f"{name}: expected an http:// or https:// URL of an OTLP/HTTP collector")
    return True


class Tracing:
    """The process's tracer, its propagator and the span processor that exports what it makes."""

    def __init__(self, provider, processor) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        from ambassador import __version__

        self._provider = provider
        self._processor = processor
        self._tracer = provider.get_tracer("ambassador", __version__)
        self._propagator = TraceContextTextMapPropagator()
        self._in_context = trace.set_span_in_context
        self._server, self._client = trace.SpanKind.SERVER, trace.SpanKind.CLIENT
        self._error = trace.Status(trace.StatusCode.ERROR)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> Tracing:
        """The SDK's pieces as its variables describe them (call only when ``tracing_wanted``)."""
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        named = environ.get("OTEL_SERVICE_NAME", "").strip() or "service.name=" in environ.get(
            "OTEL_RESOURCE_ATTRIBUTES", "")
        resource = Resource.create({} if named else {SERVICE_NAME: "ambassador"})
        provider = TracerProvider(resource=resource, shutdown_on_exit=False)  # shut down by ``shutdown``
        processor = BatchSpanProcessor(OTLPSpanExporter())
        provider.add_span_processor(processor)
        _forward_sdk_warnings()
        return cls(provider, processor)

    # -- the inbound request (ambassador.web.proxy)

    def server_span(self, headers: Mapping[str, str], method: str):
        """The span of an inbound request, continuing the caller's trace when it sent a ``traceparent``."""
        context = self._propagator.extract(headers) if "traceparent" in headers else None
        method = method if method in _KNOWN_METHODS else "_OTHER"
        return self._tracer.start_span(method, context=context, kind=self._server, attributes={
            "http.request.method": method, "url.scheme": "http"})

    @staticmethod
    def routed(span, method: str, path: str, template: str, adapter: str) -> None:
        """The request for ``path`` (checked plain: ``ambassador.web.proxy``) was routed to ``adapter``'s
        route ``template`` (``/movies``, ``/tmdb/{path}``)."""
        if span.is_recording():
            span.update_name(f"{method if method in _KNOWN_METHODS else '_OTHER'} {template}")
            span.set_attributes({"http.route": template, "url.path": path, "ambassador.adapter": adapter})

    def answered(self, span, status: int, cache: str | None, problem: str | None) -> None:
        """Ends the server span with what the caller was answered (499: it left first)."""
        if span.is_recording():
            attributes: dict[str, Any] = {"http.response.status_code": status}  # one call: each takes a lock
            if cache is not None:
                attributes["ambassador.cache"] = cache
            if problem is not None:
                attributes["ambassador.problem"] = problem
            if status >= 500:
                attributes["error.type"] = str(status)
                span.set_status(self._error)
            span.set_attributes(attributes)
        span.end()

    @staticmethod
    def log_ids(span) -> dict[str, str]:
        """The access log's ``trace_id`` and ``span_id``, as W3C trace context writes them."""
        context = span.get_span_context()
        return {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x")}

    # -- one upstream attempt (ambassador.pipeline.stages.send)

    def client_span(self, parent, method: str, base_url: str, path: str, resend_count: int):
        """The span of one attempt, a child of the inbound request's span ``parent``. ``path`` is the
        request's path, below the base URL's own (a plugin's may have one): the query, where a credential
        may be, is never in a span."""
        scheme, host, port, prefix = _parts(base_url)
        method = method if method in _KNOWN_METHODS else "_OTHER"
        attributes: dict[str, Any] = {"http.request.method": method, "server.address": host,
                                      "server.port": port, "url.scheme": scheme, "url.path": prefix + path}
        if resend_count:
            attributes["http.request.resend_count"] = resend_count
        return self._tracer.start_span(method, context=self._in_context(parent), kind=self._client,
                                       attributes=attributes)

    def traceparent(self, span) -> dict[str, str]:
        """``traceparent`` (and ``tracestate``) naming ``span``, for an adapter that propagates the trace."""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, self._in_context(span))
        return carrier

    def attempt_ended(self, span, status: int | None, failure: str | None = None) -> None:
        """Ends a client span: the upstream's status, or ``failure`` (the problem kind) when there was none.
        Errors as the semantic conventions say for a client: a 4xx or 5xx, or no answer."""
        if span.is_recording():
            attributes: dict[str, Any] = {} if status is None else {"http.response.status_code": status}
            if failure is not None or (status is not None and status >= 400):
                attributes["error.type"] = failure or str(status)
                span.set_status(self._error)
            span.set_attributes(attributes)
        span.end()

    def shutdown(self, bound: float = SHUTDOWN_BOUND) -> None:
        """Send what is queued and stop the exporter's thread, waiting ``bound`` seconds at most (the SDK's
        own shutdown may wait out the exporter's timeout, 10 s by default)."""
        stopping = threading.Thread(target=self._provider.shutdown, name="ambassador-tracing-shutdown", daemon=True)
        stopping.start()
        stopping.join(bound)
        if stopping.is_alive():
            log.warn("Spans not all exported within {bound:g} s of stopping: the rest are dropped", bound=bound)


@lru_cache(maxsize=64)
def _parts(base_url: str) -> tuple[str, str, int, str]:
    """Scheme, host, port and path prefix of an adapter's base URL (checked when it was configured)."""
    parts = urlsplit(base_url)
    return (parts.scheme, parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80),
            parts.path.rstrip("/"))


class _ToTwistedLog(logging.Handler):
    """The SDK's warnings (a collector unreachable, a queue full) as ambassador.tracing log events."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:
            text = str(record.msg)
        log.warn("OpenTelemetry: {text}", text=text)


def _forward_sdk_warnings() -> None:
    sdk_log = logging.getLogger("opentelemetry")
    if not any(isinstance(handler, _ToTwistedLog) for handler in sdk_log.handlers):
        sdk_log.addHandler(_ToTwistedLog(logging.WARNING))
        sdk_log.propagate = False  # not also to stderr, by logging's last resort
