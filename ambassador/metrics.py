"""Prometheus metrics: one registry per ambassador, label values always bounded.

Labels are adapter names, route names (templates such as ``tmdb-v3``), status
classes and outcome words: never raw paths, query strings or credentials.
Label children used on every request are created once, at mount time. The
instruments are prometheus_client's, on a registry of this ``Metrics`` (not the
global one), so tests and processes can each build their own.
"""

from __future__ import annotations

from prometheus_client import (CollectorRegistry, Counter, Gauge, GCCollector, Histogram, Info, PlatformCollector,
                               ProcessCollector, generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder

from ambassador import __version__
from ambassador.pipeline.stages.breaker import CLOSED, HALF_OPEN, OPEN

# Latencies of a sidecar in front of an internet API: sub-millisecond cache
# hits up to the 10 s default deadline.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
# The problem kinds (docs/problems.md) that say how the outside service or the ambassador's own limits
# answered a routed request: each served adapter has their series from the start. Other kinds (the
# caller's mistakes, an adapter's own) are counted from their first answer.
PROBLEM_KINDS = ("credential-missing", "credential-rejected", "circuit-open", "concurrency-limit", "rate-limited",
                 "upstream-unreachable", "upstream-timeout", "upstream-too-large", "upstream-bad-answer",
                 "upstream-error", "upstream-unavailable", "upstream-rate-limited", "internal-error")
CACHE_OUTCOMES = ("hit", "miss", "refreshed", "revalidated", "stale-while-revalidate", "stale-if-error",
                  "collapsed", "bypass")


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        # What every Prometheus client exposes by convention: process_* (CPU, memory, file descriptors,
        # start time), python_info and python_gc_*; and which ambassador this is.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        Info("ambassador_build", "The ambassador's version (always 1).", registry=r).info({"version": __version__})
        self.requests = Counter("ambassador_requests", "Inbound requests answered, by status class.",
                                ["adapter", "route", "code_class"], registry=r)
        self.request_seconds = Histogram("ambassador_request_duration_seconds",
                                         "Time from receiving an inbound request to finishing its answer.",
                                         ["adapter", "route"], registry=r, buckets=_BUCKETS)
        self.in_flight = Gauge("ambassador_requests_in_flight", "Inbound requests being answered now.",
                               ["adapter"], registry=r)
        self.upstream_attempts = Counter("ambassador_upstream_attempts",
                                         "Requests sent to an outside service, by outcome (status class, "
                                         "timeout, unreachable, cancelled, too-large, undecodable, proxy-failed, "
                                         "proxy-timeout).", ["adapter", "outcome"], registry=r)
        self.upstream_seconds = Histogram("ambassador_upstream_duration_seconds",
                                          "Time one upstream attempt took, whole body included.",
                                          ["adapter"], registry=r, buckets=_BUCKETS)
        self.retries = Counter("ambassador_upstream_retries", "Upstream attempts that were retries.",
                               ["adapter"], registry=r)
        self.rate_limit_waits = Counter("ambassador_rate_limit_waits", "Requests that waited for the "
                                        "client-side rate limit.", ["adapter"], registry=r)
        self.rate_limit_rejections = Counter("ambassador_rate_limit_rejections", "Requests answered 429 "
                                             "because the rate-limit queue was full.", ["adapter"], registry=r)
        self.rate_limit_mode = Gauge("ambassador_rate_limit_mode", "1 for how the rate limit is enforced now: "
                                     "shared (through Redis, by every replica) or local (by this process "
                                     "alone, Redis being away).", ["adapter", "mode"], registry=r)
        self.concurrency_rejections = Counter("ambassador_concurrency_rejections", "Requests answered 503 "
                                              "because too many were in flight upstream.", ["adapter"],
                                              registry=r)
        self.cache_answers = Counter("ambassador_cache_answers", "GET/HEAD answers by what the response cache "
                                     "did: hit, miss, refreshed, revalidated, stale-while-revalidate, "
                                     "stale-if-error, collapsed, bypass.", ["adapter", "outcome"], registry=r)
        self.peer_asks = Counter("ambassador_peer_asks", "Cache misses asked of the process owning the key "
                                 "(--workers), by outcome: relayed (it answered), fallback (it could not be "
                                 "asked; this process fetched from the upstream itself).", ["outcome"],
                                 registry=r)
        self.problems = Counter("ambassador_problems", "Problem answers (application/problem+json) by kind "
                                "(docs/problems.md); adapter is empty for a request no route took.",
                                ["adapter", "kind"], registry=r)
        self.reloads = Counter("ambassador_reloads", "Configuration reloads (SIGHUP), by outcome: ok, error "
                               "(the running configuration stayed).", ["outcome"], registry=r)
        for outcome in ("ok", "error"):
            self.reloads.labels(outcome)
        for outcome in ("relayed", "fallback"):
            self.peer_asks.labels(outcome)

    def serve(self, adapter: str) -> None:
        """Make every per-adapter counter's series for ``adapter``, at 0 until something is counted: a
        served adapter's series exist from the start, so rate() and alerts on them work from the first
        scrape. (Route series are made when a route is mounted: ``route``.)"""
        UpstreamMetrics(self, adapter)
        self.cache_answers_of(adapter)
        for counter in (self.retries, self.rate_limit_waits, self.rate_limit_rejections, self.concurrency_rejections):
            counter.labels(adapter)
        for kind in PROBLEM_KINDS:
            self.problems.labels(adapter, kind)

    def cache_answers_of(self, adapter: str) -> dict:
        """The cache-answer label children of one adapter, by outcome."""
        return {o: self.cache_answers.labels(adapter, o) for o in CACHE_OUTCOMES}

    def watch_cache(self, store) -> None:
        """Report the cache's size at scrape time (stores that keep count: the in-memory one)."""
        self.registry.register(_CacheCollector(store))

    def watch(self, readiness) -> None:
        """Report adapter state (credential, readiness) at scrape time, from ``readiness``."""
        self.registry.register(_StateCollector(readiness))
        self.registry.register(_UpstreamCollector(readiness))

    def upstream(self, adapter: str) -> UpstreamMetrics:
        return UpstreamMetrics(self, adapter)

    def route(self, adapter: str, route: str) -> RouteMetrics:
        return RouteMetrics(self, adapter, route)

    def exposition(self) -> bytes:
        """The Prometheus text format."""
        return generate_latest(self.registry)

    def exposition_for(self, accept: str) -> tuple[bytes, str]:
        """The exposition a scraper sending ``accept`` asks for, and its content type: OpenMetrics
        when it accepts ``application/openmetrics-text``, else the Prometheus text format."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type


class RouteMetrics:
    """The label children one route updates on every request, bound once."""

    def __init__(self, metrics: Metrics, adapter: str, route: str) -> None:
        self._by_class = {int(c[0]): metrics.requests.labels(adapter, route, c) for c in STATUS_CLASSES}
        self._other = self._by_class[5]  # a status outside 100-599 counts as 5xx
        self._seconds = metrics.request_seconds.labels(adapter, route)
        self.in_flight = metrics.in_flight.labels(adapter)

    def answered(self, status: int, seconds: float) -> None:
        self._by_class.get(status // 100, self._other).inc()
        self._seconds.observe(seconds)


class UpstreamMetrics:
    """The label children one adapter's upstream attempts update, bound once."""

    OUTCOMES = STATUS_CLASSES + ("timeout", "cancelled", "too-large", "undecodable", "unreachable", "proxy-failed",
                                 "proxy-timeout")

    def __init__(self, metrics: Metrics, adapter: str) -> None:
        self._attempts = {o: metrics.upstream_attempts.labels(adapter, o) for o in self.OUTCOMES}
        self._seconds = metrics.upstream_seconds.labels(adapter)

    def attempted(self, outcome: str, seconds: float) -> None:
        self._attempts[outcome].inc()
        self._seconds.observe(seconds)


class _StateCollector:
    def __init__(self, readiness) -> None:
        self._readiness = readiness

    def collect(self):
        present = GaugeMetricFamily("ambassador_credential_present",
                                    "1 when the adapter has a credential to send.", labels=["adapter"])
        reloads = CounterMetricFamily("ambassador_credential_reloads",
                                      "Times a credential file changed and was re-read.", labels=["adapter"])
        ready = GaugeMetricFamily("ambassador_adapter_ready", "1 when the adapter is ready to serve.",
                                  labels=["adapter"])
        circuit = GaugeMetricFamily("ambassador_circuit_state", "1 for the circuit breaker's state now "
                                    "(closed, open, half_open), 0 for the others.", labels=["adapter", "state"])
        for state in self._readiness.adapters:
            credential = state.adapter.credential
            present.add_metric([state.adapter.name], 1.0 if credential.present() else 0.0)
            reloads.add_metric([state.adapter.name], credential.reloads())
            ready.add_metric([state.adapter.name], 0.0 if state.reasons() else 1.0)
            if state.breaker is not None:
                now = state.breaker.state
                for name, label in _CIRCUIT_STATES.items():
                    circuit.add_metric([state.adapter.name, label], 1.0 if name == now else 0.0)
        yield from (present, reloads, ready, circuit)
        store = self._readiness.cache_store
        if store is not None:
            yield GaugeMetricFamily("ambassador_cache_store_available",
                                    "1 when the shared cache (Redis) can be asked.", value=float(store.available))


class _CacheCollector:
    def __init__(self, store) -> None:
        self._store = store

    def collect(self):
        store = self._store
        yield GaugeMetricFamily("ambassador_cache_bytes", "Bytes the in-memory response cache holds.",
                                value=store.bytes)
        yield GaugeMetricFamily("ambassador_cache_max_bytes", "The in-memory response cache's bound.",
                                value=store.max_bytes)
        yield GaugeMetricFamily("ambassador_cache_entries", "Answers the in-memory response cache holds.",
                                value=len(store))
        yield CounterMetricFamily("ambassador_cache_evictions", "Entries evicted to stay within the bound.",
                                  value=store.evictions)


_CIRCUIT_STATES = {CLOSED: "closed", OPEN: "open", HALF_OPEN: "half_open"}  # label values: Prometheus style


class _UpstreamCollector:
    """``ambassador_upstream_up``: what /upstreams says of each outside service (never readiness)."""

    def __init__(self, health) -> None:
        self._health = health

    def collect(self):
        up = GaugeMetricFamily("ambassador_upstream_up", "1 unless the outside service is known to be failing "
                               "(credential rejected, circuit open, probe failed); see /upstreams.",
                               labels=["adapter"])
        for state in self._health.adapters:
            up.add_metric([state.adapter.name], 0.0 if state.upstream_reasons() else 1.0)
        yield up
