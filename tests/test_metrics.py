"""The lock-free instruments: exposition as prometheus_client's own metrics give it, values after known work."""

import re

import prometheus_client
from prometheus_client import CollectorRegistry, disable_created_metrics, enable_created_metrics, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ambassador.instruments import Family
from ambassador.metrics import _BUCKETS, Metrics

_PROMETHEUS_KINDS = {"counter": prometheus_client.Counter, "gauge": prometheus_client.Gauge,
                     "histogram": prometheus_client.Histogram}


def samples(exposition: bytes) -> dict:
    """{(sample name, frozenset(labels)): value} from the Prometheus text format."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(exposition.decode())
        for s in family.samples
    }


def without_created_values(exposition: bytes) -> str:
    """The text with each _created sample's value (a clock time) blanked: the rest must match exactly."""
    return re.sub(r"^(\w+_created(\{.*\})?) \S+$", r"\1 T", exposition.decode(), flags=re.M)


def twins():
    """Our Metrics, and prometheus_client's own instruments with the same names, help, labels and buckets."""
    ours = Metrics()
    registry = CollectorRegistry()
    theirs = {}
    for attribute, family in vars(ours).items():
        if isinstance(family, Family):
            kind = _PROMETHEUS_KINDS[family.kind.TYPE]
            extra = {"buckets": _BUCKETS} if kind is prometheus_client.Histogram else {}
            theirs[attribute] = kind(family.name, family.documentation, family.labelnames, registry=registry,
                                     **extra)
    return ours, registry, theirs


# (family, label values, method, argument); histogram values on a bound, between bounds, past the last
# bound, zero and negative.
WORK = [
    ("requests", ("tmdb", "movies", "2xx"), "inc", 1),
    ("requests", ("tmdb", "movies", "2xx"), "inc", 1),
    ("requests", ("", "unmatched", "4xx"), "inc", 1),
    ("requests", ("tmdb", "movies", "5xx"), "inc", 0),
    ("request_seconds", ("tmdb", "movies"), "observe", 0.005),
    ("request_seconds", ("tmdb", "movies"), "observe", 0.0051),
    ("request_seconds", ("tmdb", "movies"), "observe", 31.0),
    ("request_seconds", ("", "unmatched"), "observe", 0.0),
    ("request_seconds", ("", "unmatched"), "observe", -0.001),
    ("in_flight", ("tmdb",), "inc", 1),
    ("in_flight", ("tmdb",), "inc", 1),
    ("in_flight", ("tmdb",), "dec", 1),
    ("in_flight", ("",), "inc", 0),
    ("upstream_attempts", ("tmdb", "timeout"), "inc", 1),
    ("upstream_seconds", ("tmdb",), "observe", 10.0),
    ("retries", ("tmdb",), "inc", 1),
    ("cache_answers", ("tmdb", "stale-if-error"), "inc", 1),
]


def test_exposition_is_what_prometheus_clients_own_metrics_give():
    ours, registry, theirs = twins()
    for attribute, labels, method, argument in WORK:
        getattr(getattr(ours, attribute).labels(*labels), method)(argument)
        getattr(theirs[attribute].labels(*labels), method)(argument)
    exposition = ours.exposition()
    assert without_created_values(exposition) == without_created_values(generate_latest(registry))
    assert b"ambassador_upstream_retries_created{" in exposition  # the created series are there, as before


def test_created_series_follow_prometheus_clients_switch():
    ours, registry, theirs = twins()
    for attribute, labels, method, argument in WORK:
        getattr(getattr(ours, attribute).labels(*labels), method)(argument)
        getattr(theirs[attribute].labels(*labels), method)(argument)
    disable_created_metrics()
    try:
        exposition = ours.exposition()
        assert exposition == generate_latest(registry)
    finally:
        enable_created_metrics()
    assert b"_created" not in exposition


def test_route_and_upstream_instruments_count_each_request():
    metrics = Metrics()
    route, unmatched = metrics.route("tmdb", "movies"), metrics.route("", "unmatched")
    upstream = metrics.upstream("tmdb")
    route.in_flight.inc()
    route.in_flight.inc()
    route.in_flight.dec()
    route.answered(200, 0.003)
    route.answered(304, 0.001)
    route.answered(404, 0.2)
    route.answered(700, 40.0)  # no such class: counted as 5xx
    unmatched.answered(431, 0.0)
    upstream.attempted("2xx", 0.0025)
    upstream.attempted("unreachable", 3.0)
    metrics.cache_answers_of("tmdb")["hit"].inc()
    values = samples(metrics.exposition())

    def value(name, **labels):
        return values[(name, frozenset(labels.items()))]

    movies = {"adapter": "tmdb", "route": "movies"}
    assert [value("ambassador_requests_total", **movies, code_class=c) for c in ("1xx", "2xx", "3xx", "4xx", "5xx")] \
        == [0, 1, 1, 1, 1]
    assert value("ambassador_requests_total", adapter="", route="unmatched", code_class="4xx") == 1
    buckets = [value("ambassador_request_duration_seconds_bucket", **movies, le=le)
               for le in ("0.001", "0.0025", "0.005", "0.1", "0.25", "30.0", "+Inf")]
    assert buckets == [1, 1, 2, 2, 3, 3, 4]
    assert value("ambassador_request_duration_seconds_count", **movies) == 4
    assert value("ambassador_request_duration_seconds_sum", **movies) == 0.003 + 0.001 + 0.2 + 40.0
    assert value("ambassador_requests_in_flight", adapter="tmdb") == 1
    assert value("ambassador_requests_in_flight", adapter="") == 0  # bound at mount time, shown before use
    assert value("ambassador_upstream_attempts_total", adapter="tmdb", outcome="2xx") == 1
    assert value("ambassador_upstream_attempts_total", adapter="tmdb", outcome="unreachable") == 1
    assert value("ambassador_upstream_attempts_total", adapter="tmdb", outcome="timeout") == 0
    assert value("ambassador_upstream_duration_seconds_bucket", adapter="tmdb", le="0.0025") == 1
    assert value("ambassador_upstream_duration_seconds_bucket", adapter="tmdb", le="2.5") == 1
    assert value("ambassador_upstream_duration_seconds_bucket", adapter="tmdb", le="5.0") == 2
    assert value("ambassador_upstream_duration_seconds_sum", adapter="tmdb") == 3.0025
    assert value("ambassador_cache_answers_total", adapter="tmdb", outcome="hit") == 1
    assert value("ambassador_cache_answers_total", adapter="tmdb", outcome="bypass") == 0
