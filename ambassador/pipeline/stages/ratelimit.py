"""The client-side rate limit: a token bucket per adapter, and the Retry-After of an upstream's 429 or 503
held for all."""

from __future__ import annotations

from typing import Protocol

from attrs import define, field
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from ambassador.exchange import UpstreamResponse
from ambassador.problems import Problem
from ambassador.pipeline.resilience import Policy, retry_after_seconds, whole_seconds
from ambassador.pipeline.stages import Call, Counted, Stage


class RateLimited(Exception):
    def __init__(self, retry_after: float) -> None:
        super().__init__(retry_after)
        self.retry_after = retry_after


@define
class TokenBucket:
    """A token bucket kept as a theoretical arrival time (GCRA): exact, O(1), no timer ticking.

    ``acquire`` fires when the request may be sent; a request that would wait
    longer than ``max_wait`` fails at once with RateLimited (it is not kept
    waiting only to be refused).
    """

    clock: IReactorTime
    rate: float
    burst: int
    max_wait: float
    _tat: float = field(default=0.0, init=False)

    def acquire(self) -> defer.Deferred:
        now = self.clock.seconds()
        interval = 1.0 / self.rate
        tat = max(self._tat, now)
        wait = tat - (self.burst - 1) * interval - now
        if wait > self.max_wait + 1e-9:
            return defer.fail(RateLimited(wait))
        self._tat = tat + interval
        if wait <= 0:
            return defer.succeed(0.0)
        return deferLater(self.clock, wait, lambda: wait)

    def hold_for(self, seconds: float) -> None:
        """Send nothing for ``seconds`` (the upstream asked us to wait), then resume at the rate."""
        self._tat = max(self._tat, self.clock.seconds() + seconds + (self.burst - 1) / self.rate)


class Bucket(Protocol):
    """What the RateLimit stage takes tokens from: a TokenBucket, or one shared through Redis
    (ambassador.shared.ratelimit)."""

    def acquire(self) -> defer.Deferred: ...

    def hold_for(self, seconds: float) -> None: ...


@define
class RateLimit:
    next: Stage
    bucket: Bucket
    policy: Policy
    clock: IReactorTime
    waits: Counted  # the adapter's
    rejections: Counted

    async def __call__(self, call: Call) -> UpstreamResponse:
        try:
            waited = await self.bucket.acquire()
        except RateLimited as limited:
            self.rejections.inc()
            raise rate_limited(call.adapter.name, self.policy, limited.retry_after) from None
        if waited:
            self.waits.inc()
        response = await self.next(call)
        if response.status in (429, 503):
            asked = retry_after_seconds(response.headers.get("retry-after"), self.clock.seconds())
            if asked:  # nobody sends before the upstream is willing again
                self.bucket.hold_for(asked)
        return response


def rate_limited(adapter: str, policy: Policy, retry_after: float) -> Problem:
    why = (f"this request would have waited more than {policy.rate_queue:g} s" if policy.rate_queue
           else "none is free for this request now")
    return Problem(429, "rate-limited", "Rate limit reached",
                   f"The ambassador sends at most {policy.rate_limit:g} requests per second to the {adapter} "
                   f"service and {why}; retry later.", headers=[("Retry-After", whole_seconds(retry_after))])
