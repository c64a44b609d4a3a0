"""Policies that keep the outside world's trouble away from the caller: what they say, and how they are read.

Per adapter: a deadline for the whole exchange, retries with exponential
backoff and full jitter, Retry-After honoured, a client-side rate limit
(token bucket), a circuit breaker and a cap on requests in flight. The
stages in ``ambassador.pipeline.stages`` enforce them; every wait is
scheduled on an injected clock, so tests drive it with ``Clock``.
"""

from __future__ import annotations

import math
import random
from email.utils import parsedate_to_datetime
from collections.abc import Callable

from attrs import fields, frozen

from ambassador.interfaces import ConfigurationError


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise ValueError
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError
    return value


def _switch(text: str) -> bool:
    lowered = text.lower()
    if lowered not in ("on", "off", "true", "false", "yes", "no"):
        raise ValueError
    return lowered in ("on", "true", "yes")


def _unless_none(text: str, parse: Callable[[str], float]) -> float | None:
    return None if text.lower() in ("none", "null") else parse(text)  # YAML's null arrives as "None"


def _optional_rate(text: str) -> float | None:
    return None if text in ("none", "off", "0") else _seconds(text)


@frozen
class Policy:
    """Resilience and cache settings for one adapter; ``POLICY_HELP`` describes them for --help."""

    timeout: float = 10.0  # whole exchange: every attempt and wait, whole body read
    attempt_timeout: float | None = None  # one attempt; None: whatever is left of the deadline
    retries: int = 2
    backoff_base: float = 0.1
    backoff_cap: float = 2.0
    retry_after_cap: float = 5.0
    rate_limit: float | None = None  # requests per second sent upstream; None: unlimited
    rate_burst: int | None = None  # default: the rate, rounded up
    # Longest a request waits for the rate limit before 429. By default no wait, as Envoy's and Kong's: the burst
    # absorbs jitter below the rate, and past it a queue only adds latency to what the rate serves anyway.
    rate_queue: float = 0.0
    breaker_failures: int = 5  # consecutive failures that open the circuit; 0: no breaker
    breaker_open: float = 10.0
    breaker_open_max: float = 60.0
    max_in_flight: int = 1024  # like Envoy's default max_requests: a safety cap, not a throughput limit
    in_flight_queue: float = 0.5  # longest a request waits for a free slot before 503
    # The response cache (ambassador.cache.responses), per adapter.
    cache: bool = True
    cache_ttl: float | None = None  # overrides the upstream's freshness; None: the upstream decides
    cache_default_ttl: float = 0.0  # freshness of answers that state none; 0: not stored
    stale_while_revalidate: float = 0.0  # floors under the upstream's own RFC 5861 windows
    stale_if_error: float = 0.0

    def updated(self, settings: dict[str, str], where: str) -> Policy:
        """A copy with ``settings`` (key → text) applied; bad keys or values name ``where``."""
        parsers = {a.name: _PARSERS[a.name] for a in fields(Policy)}
        changes = {}
        for key, text in settings.items():
            if key not in parsers:
                raise ConfigurationError(f"{where}: unknown policy key; known: {', '.join(parsers)}")
            try:
                changes[key] = parsers[key](str(text).strip())
            except ValueError:
                raise ConfigurationError(f"{where}: {key} must be {_EXPECTED[key]}")
        policy = Policy(**{**{a.name: getattr(self, a.name) for a in fields(Policy)}, **changes})
        if policy.timeout <= 0:
            raise ConfigurationError(f"{where}: timeout must be more than 0")
        return policy

    @property
    def burst(self) -> int:
        return self.rate_burst or max(1, math.ceil(self.rate_limit or 1))


_PARSERS: dict[str, Callable[[str], object]] = {
    "timeout": _seconds, "attempt_timeout": lambda t: _unless_none(t, _seconds),
    "retries": _count, "backoff_base": _seconds, "backoff_cap": _seconds, "retry_after_cap": _seconds,
    "rate_limit": _optional_rate, "rate_burst": _count, "rate_queue": _seconds,
    "breaker_failures": _count, "breaker_open": _seconds, "breaker_open_max": _seconds,
    "max_in_flight": lambda t: max(1, _count(t)), "in_flight_queue": _seconds,
    "cache": _switch, "cache_ttl": lambda t: _unless_none(t, _seconds), "cache_default_ttl": _seconds,
    "stale_while_revalidate": _seconds, "stale_if_error": _seconds,
}
_EXPECTED = {name: "a number of seconds" for name in _PARSERS} | {
    "retries": "a whole number", "rate_burst": "a whole number", "breaker_failures": "a whole number",
    "max_in_flight": "a whole number", "attempt_timeout": "a number of seconds or 'none'",
    "rate_limit": "requests per second or 'none'", "cache": "on or off",
    "cache_ttl": "a number of seconds or 'none'",
}
POLICY_HELP = {
    "timeout": "seconds for the whole exchange, all attempts included (10)",
    "attempt_timeout": "seconds for one attempt, or none: what is left of the deadline (none)",
    "retries": "retries after the first attempt, GET/HEAD only (2)",
    "backoff_base": "first backoff ceiling in seconds; full jitter, doubling (0.1)",
    "backoff_cap": "largest backoff in seconds (2)",
    "retry_after_cap": "longest Retry-After honoured, seconds (5)",
    "rate_limit": "requests per second sent upstream, or none (TMDB: 40)",
    "rate_burst": "token bucket size (default: the rate)",
    "rate_queue": "seconds a request may wait for the rate limit before 429; 0: none (0)",
    "breaker_failures": "consecutive failures that open the circuit, 0 for none (5)",
    "breaker_open": "seconds the circuit stays open on the first trip (10)",
    "breaker_open_max": "longest open interval, doubling on repeated trips (60)",
    "max_in_flight": "upstream requests in flight at once (1024)",
    "in_flight_queue": "seconds a request may wait for a free slot before 503 (0.5)",
    "cache": "cache this adapter's answers: on or off (on; --no-cache turns the cache off for all)",
    "cache_ttl": "seconds every cacheable answer stays fresh, whatever the upstream says, or none (none)",
    "cache_default_ttl": "seconds an answer with no Cache-Control or Expires stays fresh; 0: not stored (0)",
    "stale_while_revalidate": "seconds a stale answer may be served while it is refreshed, at least (0)",
    "stale_if_error": "seconds a stale answer may be served while the upstream fails, at least (0; TMDB: 300)",
}


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or HTTP-date), None if unusable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    when = http_date(value)
    return None if when is None else max(0.0, when - now)


def http_date(value: str | None) -> float | None:
    """The time an HTTP-date (``Sun, 06 Nov 1994 08:49:37 GMT``) stands for, or None when it is not one."""
    if value is None:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def full_jitter_backoff(policy: Policy, retry: int, rng: random.Random) -> float:
    """Seconds before retry number ``retry`` (0-based): uniform in [0, min(cap, base·2^retry)]."""
    return rng.uniform(0, min(policy.backoff_cap, policy.backoff_base * 2**retry))


def whole_seconds(seconds: float) -> str:
    """A Retry-After value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))


def resolve_policies(adapters, entries: list[str], *, source: str = "--policy") -> dict[str, Policy]:
    """Each adapter's Policy: its own defaults, then ``KEY=VALUE`` entries for every adapter,
    then ``ADAPTER.KEY=VALUE`` entries for that one (later entries win)."""
    names = {adapter.name for adapter in adapters}
    everyone: dict[str, str] = {}
    one: dict[str, dict[str, str]] = {name: {} for name in names}
    for entry in entries:
        target, _, value = entry.partition("=")
        adapter, dot, key = target.strip().rpartition(".")
        if not _ or not key:
            raise ConfigurationError(f"{source}: expected KEY=VALUE or ADAPTER.KEY=VALUE")
        if dot and adapter not in names:
            raise ConfigurationError(f"{source}: ADAPTER.KEY=VALUE names an adapter that is not served; "
                                     f"served: {', '.join(sorted(names))}")
        (one[adapter] if dot else everyone)[key] = value
    policies = {}
    for adapter in adapters:
        defaults = getattr(adapter, "policy_defaults", None) or {}
        policies[adapter.name] = (
            Policy()
            .updated(dict(defaults), f"{adapter.name} defaults")
            .updated(everyone, source)
            .updated(one[adapter.name], source)
        )
    return policies
