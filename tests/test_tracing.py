"""OpenTelemetry tracing, end to end: ``twistd ambassador`` as a real process exporting to a fake OTLP/HTTP
collector on loopback, which decodes the protobuf it is sent; a fake TMDB and a fake API behind it."""

from __future__ import annotations

import gzip
import json
import signal
import sys

import pytest
import pytest_twisted
from attrs import define, field
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                       ExportTraceServiceResponse)
from twisted.internet import defer, reactor
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from ambassador.interfaces import ConfigurationError
from ambassador.testing import FakeAPI, serving
from ambassador.tracing import tracing_wanted
from conftest import SECRETS, adapters_from_yaml, get, tmdb_env
from processes import run_twistd, spawn_ambassador

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
SERVER, CLIENT = 2, 3  # Span.SpanKind in the protocol
STATUS_ERROR = 2


@define
class Collected:
    """One span as the collector decoded it."""

    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent: str
    attributes: dict
    status: int


def _value(any_value):
    return getattr(any_value, any_value.WhichOneof("value"))


@define
class FakeCollector(Resource):
    """An OTLP/HTTP collector: decodes each ExportTraceServiceRequest posted to /v1/traces into ``spans``
    and keeps the bodies as sent in ``bodies``; ``hang`` holds every export unanswered."""

    hang: bool = False
    base_url: str = field(default="", init=False)  # where ``serving`` serves it
    spans: list[Collected] = field(factory=list)
    bodies: list[bytes] = field(factory=list)
    paths: list[bytes] = field(factory=list)
    held: list = field(factory=list)
    _waiting: list = field(factory=list)
    isLeaf = True

    def __attrs_post_init__(self) -> None:
        Resource.__init__(self)

    def render_POST(self, request):
        self.paths.append(request.path)
        body = request.content.read()
        if request.getHeader("content-encoding") == "gzip":
            body = gzip.decompress(body)
        self.bodies.append(body)
        if self.hang:
            self.held.append(request)
            return NOT_DONE_YET
        for resource_spans in ExportTraceServiceRequest.FromString(body).resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(Collected(
                        resource.get("service.name", ""), span.name, span.kind, span.trace_id.hex(),
                        span.span_id.hex(), span.parent_span_id.hex(),
                        {a.key: _value(a.value) for a in span.attributes}, span.status.code))
        for waiting in list(self._waiting):
            self._check(*waiting)
        request.setHeader("Content-Type", "application/x-protobuf")
        return ExportTraceServiceResponse().SerializeToString()

    def wait_for(self, condition) -> defer.Deferred:
        """Fires with the spans once ``condition(spans)`` holds. The exporter runs in the ambassador's own
        thread on its own schedule: a generous bound, never a sleep."""
        d: defer.Deferred = defer.Deferred()
        d.addTimeout(60, reactor)
        self._waiting.append((condition, d))
        self._check(condition, d)
        return d

    def _check(self, condition, d) -> None:
        if not d.called and condition(self.spans):
            self._waiting.remove((condition, d))
            d.callback(self.spans)


@pytest.fixture
def collector():
    with serving(FakeCollector()) as fake:
        yield fake
        for request in fake.held:
            request.transport.abortConnection()


@pytest.fixture
def fake_api():
    with serving(FakeAPI(accept=lambda r: r.headers.get("authorization") == "Bearer bearer-secret")) as fake:
        yield fake


def _config(tmp_path, fake_tmdb, fake_api) -> str:
    path = tmp_path / "ambassador.yaml"
    path.write_text(f"""
adapters:
  tmdb:
    type: tmdb
    base_url: {fake_tmdb.base_url}/egress
    policy: {{backoff_base: 0.01, backoff_cap: 0.01}}
  traced:
    mount: /traced
    base_url: {fake_api.base_url}/v1
    propagate_trace: true
    credential: {{style: bearer, secret: {{env: API_TOKEN}}}}
  untraced:
    mount: /untraced
    base_url: {fake_api.base_url}
    credential: {{style: bearer, secret: {{env: API_TOKEN}}}}
""")
    return str(path)


def _tracing_env(collector, fake_tmdb, **more) -> dict[str, str]:
    return tmdb_env(fake_tmdb, TMDB_API_KEY="test-api-key", API_TOKEN="bearer-secret",
                    OTEL_EXPORTER_OTLP_ENDPOINT=collector.base_url, OTEL_SERVICE_NAME="egress-test",
                    **{"OTEL_BSP_SCHEDULE_DELAY": "50", **more})


def _access_lines(output: bytes) -> dict[str, dict]:
    """The JSON access-log events by request id."""
    events = [json.loads(line) for line in output.decode().splitlines() if line.startswith("{")]
    return {e["request_id"]: e for e in events if e.get("logger") == "ambassador.access"}


def _servers(spans, route):
    return [s for s in spans if s.kind == SERVER and s.attributes.get("http.route") == route]


@pytest_twisted.ensureDeferred
async def test_spans_of_requests_are_exported_with_their_links_and_never_a_secret(collector, fake_tmdb, fake_api,
                                                                                  tmp_path):
    fake_tmdb.base_path = "/egress"  # TMDB below an egress gateway's path: url.path says the whole path
    process = spawn_ambassador("--port", "0", "--admin-port", "none", "--log-format", "json",
                               "--config", _config(tmp_path, fake_tmdb, fake_api),
                               env=_tracing_env(collector, fake_tmdb), cwd=tmp_path)
    try:
        url = f"http://127.0.0.1:{await process.listening}"
        caller = {"traceparent": [TRACEPARENT], "tracestate": ["vendor=opaque"], "X-Request-ID": ["miss"]}
        response, _ = await get(url + "/movies?api_key=caller-own-key", headers=caller)
        assert response.code == 200
        response, _ = await get(url + "/movies?api_key=caller-own-key", headers={"X-Request-ID": ["hit"]})
        assert response.code == 200
        fake_tmdb.script = [(503, {}, b"{}")]  # once: the retry gets the answer
        response, _ = await get(url + "/tmdb/3/movie/550", headers={"X-Request-ID": ["retried"]})
        assert response.code == 200
        fake_tmdb.fault = "reset"
        response, _ = await get(url + "/tmdb/3/movie/551", headers={"X-Request-ID": ["failed"]})
        assert response.code == 502
        fake_tmdb.fault = None
        for mount in ("/traced", "/untraced"):
            response, _ = await get(url + mount + "/things", headers={"traceparent": [TRACEPARENT],
                                                                      "X-Request-ID": [mount[1:]]})
            assert response.code == 200
        spans = await collector.wait_for(lambda spans: len([s for s in spans if s.kind == SERVER]) >= 6)
    finally:
        process.transport.signalProcess(signal.SIGTERM)
    assert await process.ended == (0, None), process.output.decode()
    assert all(s.service == "egress-test" for s in spans)
    assert {path for path in collector.paths} == {b"/v1/traces"}
    by_id = {s.span_id: s for s in spans}
    logged = _access_lines(process.output)

    # The caller's trace continued: its span is the parent of ours, and ours of the upstream attempt.
    miss, hit = _servers(spans, "/movies")
    assert (miss.trace_id, miss.parent) == (CALLER_TRACE, CALLER_SPAN)
    assert miss.name == "GET /movies"
    assert miss.attributes["ambassador.cache"] == "miss"
    assert miss.attributes["http.request.method"] == "GET" and miss.attributes["http.response.status_code"] == 200
    assert miss.attributes["ambassador.adapter"] == "tmdb" and miss.attributes["url.path"] == "/movies"
    attempt, = [s for s in spans if s.kind == CLIENT and s.parent == miss.span_id]
    assert attempt.trace_id == CALLER_TRACE
    assert attempt.attributes["server.address"] == "127.0.0.1"
    assert attempt.attributes["server.port"] == int(fake_tmdb.base_url.rsplit(":", 1)[1])
    assert attempt.attributes["url.path"] == "/egress/3/discover/movie"  # below the base URL's path
    assert attempt.attributes["http.response.status_code"] == 200
    assert "http.request.resend_count" not in attempt.attributes
    assert (logged["miss"]["trace_id"], logged["miss"]["span_id"]) == (miss.trace_id, miss.span_id)

    # A cache hit: a new trace (no traceparent), no attempt.
    assert hit.trace_id != CALLER_TRACE and hit.parent == "" and hit.attributes["ambassador.cache"] == "hit"
    assert not [s for s in spans if s.parent == hit.span_id]
    assert (logged["hit"]["trace_id"], logged["hit"]["span_id"]) == (hit.trace_id, hit.span_id)

    # A retry: two attempts under one server span, the second counted as a resend; the 503 an error.
    retried = by_id[logged["retried"]["span_id"]]
    assert retried.attributes["http.route"] == "/tmdb/{path}" and retried.name == "GET /tmdb/{path}"
    first, second = sorted((s for s in spans if s.parent == retried.span_id),
                           key=lambda s: s.attributes.get("http.request.resend_count", 0))
    assert (first.attributes["http.response.status_code"], first.status) == (503, STATUS_ERROR)
    assert second.attributes["http.request.resend_count"] == 1
    assert second.attributes["http.response.status_code"] == 200 and second.status != STATUS_ERROR

    # A failure: the server span an error with the problem's kind; each attempt says why it failed.
    failed = by_id[logged["failed"]["span_id"]]
    assert failed.status == STATUS_ERROR and failed.attributes["http.response.status_code"] == 502
    assert failed.attributes["ambassador.problem"] == "upstream-unreachable"
    attempts = [s for s in spans if s.parent == failed.span_id]
    assert len(attempts) == 3  # the default: two retries
    assert all(a.attributes["error.type"] == "upstream-unreachable" and a.status == STATUS_ERROR for a in attempts)

    # traceparent reaches the upstream only from the adapter that opts in, naming the attempt's span.
    sent = {r.path: r.headers for r in fake_api.requests}
    traced = by_id[logged["traced"]["span_id"]]
    traced_attempt, = [s for s in spans if s.parent == traced.span_id]
    assert traced_attempt.attributes["url.path"] == "/v1/things"
    assert sent["/v1/things"]["traceparent"] == f"00-{CALLER_TRACE}-{traced_attempt.span_id}-01"
    assert "traceparent" not in sent["/things"] and "tracestate" not in sent["/things"]
    assert all("traceparent" not in r.headers and "tracestate" not in r.headers for r in fake_tmdb.requests)

    # No secret in any span, any attribute, anything sent to the collector.
    assert collector.bodies
    for body in collector.bodies:
        for secret in SECRETS:
            assert secret.encode() not in body
    assert b"api_key" not in b"".join(collector.bodies)
    for secret in SECRETS:
        assert secret not in process.output.decode()


async def one_request_then_sigterm(collector, fake_tmdb, tmp_path, *, before_sigterm=lambda: None):
    """An ambassador exporting only at exit answers one request, then gets SIGTERM; returns it once it exited 0."""
    env = _tracing_env(collector, fake_tmdb, OTEL_BSP_SCHEDULE_DELAY="600000")  # never by the schedule
    process = spawn_ambassador("--port", "0", "--admin-port", "none", "--grace-period", "1",
                               env=env, cwd=tmp_path)
    try:
        url = f"http://127.0.0.1:{await process.listening}"
        response, _ = await get(url + "/movies")
        assert response.code == 200
        before_sigterm()
    finally:
        process.transport.signalProcess(signal.SIGTERM)
    assert await process.ended == (0, None), process.output.decode()
    return process


@pytest_twisted.ensureDeferred
async def test_spans_still_queued_at_sigterm_are_flushed_before_the_process_exits(collector, fake_tmdb, tmp_path):
    def nothing_exported_yet():
        assert collector.spans == []

    await one_request_then_sigterm(collector, fake_tmdb, tmp_path, before_sigterm=nothing_exported_yet)
    assert {s.kind for s in collector.spans} == {SERVER, CLIENT}


@pytest_twisted.ensureDeferred
async def test_a_collector_that_never_answers_does_not_hold_up_the_exit(fake_tmdb, tmp_path):
    with serving(FakeCollector(hang=True)) as collector:
        process = await one_request_then_sigterm(collector, fake_tmdb, tmp_path)
        assert collector.bodies  # the export was tried, and given up on
        assert "Spans not all exported within 3 s" in process.output.decode()
        for request in collector.held:
            request.transport.abortConnection()


# A process that only configures itself (Options, then assemble) and says what it loaded and started.
_INSPECT = """
import json, sys, threading
from twisted.internet import reactor
from ambassador.app.service import Options, assemble
options = Options()
options.parseOptions(["--port", "0", "--admin-port", "none"])
assemble(reactor, options.settings)
print(json.dumps({"sdk": sorted(m for m in sys.modules if m.startswith("opentelemetry")),
                  "threads": [t.name for t in threading.enumerate()]}))
"""


async def _inspected(env, tmp_path) -> dict:
    output, code = await run_python(_INSPECT, env, tmp_path)
    assert code == 0, output
    return json.loads(output.splitlines()[-1])


async def run_python(script: str, env, cwd) -> tuple[str, int]:
    from twisted.internet.utils import getProcessOutputAndValue

    from processes import BASE_ENV
    out, err, code = await getProcessOutputAndValue(sys.executable, ["-c", script], env={**BASE_ENV, **env},
                                                    path=str(cwd))
    return (out + err).decode(), code


@pytest_twisted.ensureDeferred
async def test_off_by_default_nothing_of_the_sdk_is_loaded_or_started(fake_tmdb, tmp_path):
    env = tmdb_env(fake_tmdb, TMDB_API_KEY="test-api-key")
    off = await _inspected(env, tmp_path)
    assert off["sdk"] == [] and not any("Otel" in name for name in off["threads"])
    for disabled in ({"OTEL_SDK_DISABLED": "true"}, {"OTEL_TRACES_EXPORTER": "none"}):
        off = await _inspected({**env, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", **disabled}, tmp_path)
        assert off["sdk"] == [] and not any("Otel" in name for name in off["threads"])
    on = await _inspected({**env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:9/v1/traces"}, tmp_path)
    assert "opentelemetry.sdk.trace" in on["sdk"] and "OtelBatchSpanRecordProcessor" in on["threads"]


@pytest_twisted.ensureDeferred
async def test_off_a_callers_traceparent_is_dropped_even_for_an_adapter_that_propagates(
        start_ambassador, fake_tmdb, fake_api, tmp_path, log_events):
    adapters = adapters_from_yaml(tmp_path, f"""
adapters:
  traced:
    mount: /traced
    base_url: {fake_api.base_url}
    propagate_trace: true
    credential: {{style: bearer, secret: {{env: API_TOKEN}}}}
""", {"API_TOKEN": "bearer-secret"})
    ambassador = await start_ambassador(adapters=adapters)
    response, _ = await get(ambassador.url + "/traced/things", headers={"traceparent": [TRACEPARENT],
                                                                        "tracestate": ["vendor=opaque"]})
    assert response.code == 200
    assert fake_api.requests[-1].path == "/things"
    assert "traceparent" not in fake_api.requests[-1].headers and "tracestate" not in fake_api.requests[-1].headers
    access, = [e for e in log_events if e.get("log_namespace") == "ambassador.access"]
    assert "trace_id" not in access and "span_id" not in access


def test_the_variables_turn_tracing_on_and_off():
    assert not tracing_wanted({})
    assert tracing_wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert tracing_wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://collector/v1/traces",
                           "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})
    assert not tracing_wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "TRUE"})
    assert not tracing_wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_TRACES_EXPORTER": "none"})
    assert not tracing_wanted({"OTEL_TRACES_EXPORTER": "otlp"})  # no endpoint: nowhere to send


@pytest.mark.parametrize("variables, named", [
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER: expected otlp or none"),
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_PROTOCOL: expected http/protobuf"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector-s3cret:4318"}, "OTEL_EXPORTER_OTLP_ENDPOINT: expected an http"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://user:s3cret@collector:port"}, "OTEL_EXPORTER_OTLP_ENDPOINT: expected"),
])
def test_a_variable_tracing_cannot_work_with_is_named_never_repeated(variables, named):
    with pytest.raises(ConfigurationError) as raised:
        tracing_wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", **variables})
    assert named in str(raised.value) and "s3cret" not in str(raised.value)


@pytest_twisted.ensureDeferred
async def test_a_bad_tracing_variable_stops_startup_with_one_line(tmp_path):
    output, code = await run_twistd("-n", "ambassador", "--port", "0", env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": "ftp://reader:s3cret-pass@collector"}, cwd=tmp_path)
    assert code != 0 and "OTEL_EXPORTER_OTLP_ENDPOINT: expected an http:// or https:// URL" in output
    assert "s3cret-pass" not in output and "Traceback" not in output


def test_propagate_trace_in_the_config_file(tmp_path):
    base = """
adapters:
  api:
    mount: /api
    base_url: http://127.0.0.1:1
    credential: {style: bearer, secret: {env: API_TOKEN}}
"""
    adapter, = adapters_from_yaml(tmp_path, base)
    assert adapter.propagate_trace is False
    adapter, = adapters_from_yaml(tmp_path, base + "    propagate_trace: true\n")
    assert adapter.propagate_trace is True
    tmdb, = adapters_from_yaml(tmp_path, "adapters:\n  tmdb: {type: tmdb, propagate_trace: true}\n")
    assert tmdb.propagate_trace is True
    tmdb, = adapters_from_yaml(tmp_path, "adapters:\n  tmdb: {type: tmdb}\n")
    assert tmdb.propagate_trace is False  # the plugin's own attribute
    with pytest.raises(ConfigurationError, match=r"adapters\.api\.propagate_trace: expected true or false"):
        adapters_from_yaml(tmp_path, base + "    propagate_trace: sometimes\n")


@pytest_twisted.ensureDeferred
async def test_help_names_the_tracing_variables(tmp_path):
    output, code = await run_twistd("ambassador", "--help", env={}, cwd=tmp_path)
    assert code == 0
    for word in ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SERVICE_NAME",
                 "OTEL_TRACES_SAMPLER", "OTEL_BSP_", "OTEL_SDK_DISABLED", "propagate_trace:"]:
        assert word in output
