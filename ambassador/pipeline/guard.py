"""One adapter's policy and the live state that enforces it, shared by its stages, readiness and metrics."""

from __future__ import annotations

from attrs import define
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from ambassador.pipeline.resilience import Policy
from ambassador.pipeline.stages.breaker import CircuitBreaker
from ambassador.pipeline.stages.ratelimit import Bucket, TokenBucket


@define
class Guard:
    policy: Policy
    breaker: CircuitBreaker | None
    bucket: Bucket | None
    slots: defer.DeferredSemaphore

    @classmethod
    def of(cls, policy: Policy, clock: IReactorTime, adapter: str = "-") -> Guard:
        """``adapter``: the name the breaker's log events give."""
        breaker = None
        if policy.breaker_failures:
            breaker = CircuitBreaker(clock, policy.breaker_failures, policy.breaker_open, policy.breaker_open_max,
                                     adapter)
        bucket = None
        if policy.rate_limit:
            bucket = TokenBucket(clock, policy.rate_limit, policy.burst, policy.rate_queue)
        return cls(policy, breaker, bucket, defer.DeferredSemaphore(policy.max_in_flight))
