"""The metrics: names, labels and buckets the README documents, values after known work, one registry each."""

from prometheus_client.parser import text_string_to_metric_families

from ambassador.metrics import Metrics


def samples(exposition: bytes) -> dict:
    """{(sample name, frozenset(labels)): value} from the Prometheus text format."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(exposition.decode())
        for s in family.samples
    }


# The README's table: name (without _total), type, label names.
DOCUMENTED = [
    ("ambassador_requests", "counter", {"adapter", "route", "code_class"}),
    ("ambassador_request_duration_seconds", "histogram", {"adapter", "route"}),
    ("ambassador_requests_in_flight", "gauge", {"adapter"}),
    ("ambassador_upstream_attempts", "counter", {"adapter", "outcome"}),
    ("ambassador_upstream_duration_seconds", "histogram", {"adapter"}),
    ("ambassador_upstream_retries", "counter", {"adapter"}),
    ("ambassador_rate_limit_waits", "counter", {"adapter"}),
    ("ambassador_rate_limit_rejections", "counter", {"adapter"}),
    ("ambassador_concurrency_rejections", "counter", {"adapter"}),
    ("ambassador_cache_answers", "counter", {"adapter", "outcome"}),
    ("ambassador_peer_asks", "counter", {"outcome"}),
    ("ambassador_problems", "counter", {"adapter", "kind"}),
    ("ambassador_build_info", "gauge", {"version"}),
]
LE = ["0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "10.0",
      "30.0", "+Inf"]


def used(metrics: Metrics) -> Metrics:
    """One label child of each per-request metric, so each family shows its samples."""
    route = metrics.route("tmdb", "movies")
    route.in_flight.inc()
    route.answered(200, 0.01)
    metrics.upstream("tmdb").attempted("2xx", 0.01)
    for counter in (metrics.retries, metrics.rate_limit_waits, metrics.rate_limit_rejections,
                    metrics.concurrency_rejections):
        counter.labels("tmdb").inc()
    metrics.cache_answers_of("tmdb")["hit"].inc()
    metrics.peer_asks.labels("relayed").inc()
    metrics.problems.labels("tmdb", "circuit-open").inc()
    return metrics


def test_exposition_has_the_documented_names_labels_and_buckets():
    exposition = used(Metrics()).exposition().decode()
    families = {family.name: family for family in text_string_to_metric_families(exposition)}
    for name, kind, labels in DOCUMENTED:
        family = families[name]
        assert family.type == kind
        values = [s for s in family.samples if not s.name.endswith("_created")]
        assert values and all(set(s.labels) - {"le"} == labels for s in values), name
        if kind == "counter":
            assert {s.name for s in values} == {name + "_total"}
        if kind == "histogram":
            assert [s.labels["le"] for s in values if s.name == name + "_bucket"] == LE
            assert {s.name for s in values} == {name + "_bucket", name + "_count", name + "_sum"}
    assert "ambassador_upstream_retries_created{" in exposition  # the created series, as prometheus_client gives


def test_each_metrics_has_its_own_registry():
    one, other = used(Metrics()), Metrics()  # a second one with the same names: no clash
    one_values, other_values = samples(one.exposition()), samples(other.exposition())
    retries = ("ambassador_upstream_retries_total", frozenset({("adapter", "tmdb")}))
    assert one_values[retries] == 1
    assert retries not in other_values


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
