"""Prometheus counters, gauges and histograms for a single-threaded server: plain numbers.

prometheus_client's own take a lock per update and walk the buckets per
observation (~3.5 µs for the ambassador's per-request metrics); Twisted serves
on one thread, so these need no lock. ``Instruments`` is the collector: at
scrape time it gives the samples prometheus_client's metrics would (``_total``,
``_bucket``/``_count``/``_sum``, ``_created``), so the exposition reads the same.
"""

from __future__ import annotations

import time
from bisect import bisect_left

from prometheus_client import metrics as _prometheus_metrics
from prometheus_client.core import Metric
from prometheus_client.utils import floatToGoString


class Counter:
    TYPE = "counter"
    __slots__ = ("value", "created")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def samples(self, created: bool):
        yield "_total", {}, self.value
        if created:
            yield "_created", {}, self.created


class Gauge:
    TYPE = "gauge"
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def samples(self, created: bool):
        yield "", {}, self.value


class Histogram:
    """Counts per bucket (one increment per observation), made cumulative at scrape time."""

    TYPE = "histogram"
    __slots__ = ("bounds", "le", "counts", "sum", "created")

    def __init__(self, bounds: tuple[float, ...], le: tuple[str, ...]) -> None:
        self.bounds, self.le = bounds, le  # shared by the family's children
        self.counts = [0] * len(le)  # the last is +Inf
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        # The first bound >= amount, as le ("less or equal") means; past the last bound, +Inf.
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount

    def samples(self, created: bool):
        count = 0.0
        for le, n in zip(self.le, self.counts):
            count += n
            yield "_bucket", {"le": le}, count
        yield "_count", {}, count
        yield "_sum", {}, self.sum
        if created:
            yield "_created", {}, self.created


class Family:
    """One metric's label children, kept in the order they were created (as prometheus_client does)."""

    def __init__(self, kind: type, name: str, documentation: str, labelnames, *child_args) -> None:
        self.kind, self.name, self.documentation = kind, name, documentation
        self.labelnames = tuple(labelnames)
        self.children: dict[tuple, Counter | Gauge | Histogram] = {}
        self._child_args = child_args

    def labels(self, *values: str):
        values = tuple(str(v) for v in values)
        child = self.children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
            child = self.children[values] = self.kind(*self._child_args)
        return child

    def collect(self, created: bool) -> Metric:
        metric = Metric(self.name, self.documentation, self.kind.TYPE)
        for values, child in self.children.items():
            labels = dict(zip(self.labelnames, values))
            for suffix, extra, value in child.samples(created):
                metric.add_sample(self.name + suffix, {**labels, **extra}, value)
        return metric


class Instruments:
    """Makes the families; as a collector (``registry.register``), exports them in that order."""

    def __init__(self) -> None:
        self.families: list[Family] = []

    def counter(self, name: str, documentation: str, labelnames) -> Family:
        return self._add(Family(Counter, name, documentation, labelnames))

    def gauge(self, name: str, documentation: str, labelnames) -> Family:
        return self._add(Family(Gauge, name, documentation, labelnames))

    def histogram(self, name: str, documentation: str, labelnames, buckets) -> Family:
        bounds = tuple(float(b) for b in buckets)  # finite and sorted; +Inf is added
        if list(bounds) != sorted(bounds) or bounds[-1] == float("inf"):
            raise ValueError(f"{name}: buckets must be finite and sorted, got {buckets}")
        return self._add(Family(Histogram, name, documentation, labelnames,
                                bounds, tuple(map(floatToGoString, bounds)) + ("+Inf",)))

    def _add(self, family: Family) -> Family:
        self.families.append(family)
        return family

    def collect(self):
        # prometheus_client's switch for the _created series (PROMETHEUS_DISABLE_CREATED_SERIES,
        # disable_created_metrics()): followed as its own counters and histograms follow it.
        created = getattr(_prometheus_metrics, "_use_created", True)
        return [family.collect(created) for family in self.families]
