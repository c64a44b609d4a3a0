"""Retries with exponential backoff and full jitter, and the upstream's Retry-After honoured.

Only GET and HEAD are retried; only failures to reach the upstream, its
timeouts, 502, 503, 504 and 429. A wait that would end past the deadline is
not taken: a 429 or 503 then goes to the caller with a Retry-After saying when.
"""

from __future__ import annotations

import random

from attrs import define, evolve
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from ambassador.exchange import UpstreamResponse
from ambassador.problems import Problem
from ambassador.pipeline.resilience import Policy, full_jitter_backoff, retry_after_seconds, whole_seconds
from ambassador.pipeline.stages import Call, Counted, Stage

_RETRIED_PROBLEMS = frozenset({"upstream-unreachable", "upstream-timeout"})


@define
class Retry:
    next: Stage
    policy: Policy
    clock: IReactorTime
    rng: random.Random
    retried: Counted  # the adapter's retries

    async def __call__(self, call: Call) -> UpstreamResponse:
        retries_left = self.policy.retries if call.request.method in ("GET", "HEAD") else 0
        while True:
            try:
                outcome: UpstreamResponse | Problem = await self.next(call)
            except Problem as problem:
                outcome = problem
            wait = self._wait(outcome, retries_left)
            if wait is None:
                break
            if self.clock.seconds() + wait >= call.deadline:
                if isinstance(outcome, UpstreamResponse) and outcome.status in (429, 503):
                    return evolve(outcome, headers={**outcome.headers, "retry-after": whole_seconds(wait)})
                break
            retries_left -= 1
            self.retried.inc()
            await deferLater(self.clock, wait)
        if isinstance(outcome, Problem):
            raise outcome
        return outcome

    def _wait(self, outcome: UpstreamResponse | Problem, retries_left: int) -> float | None:
        """Seconds to wait before retrying ``outcome``, or None when it must not be retried."""
        if retries_left <= 0:
            return None
        policy = self.policy
        if isinstance(outcome, Problem):
            return self._backoff(retries_left) if outcome.kind in _RETRIED_PROBLEMS else None
        if outcome.status in (429, 503):
            asked = retry_after_seconds(outcome.headers.get("retry-after"), self.clock.seconds())
            if asked is None:
                return self._backoff(retries_left)
            return asked if asked <= policy.retry_after_cap else None
        return self._backoff(retries_left) if outcome.status in (502, 504) else None

    def _backoff(self, retries_left: int) -> float:
        # Drawn only for an outcome that is retried: most are not, and the draw is a call into random.
        return full_jitter_backoff(self.policy, self.policy.retries - retries_left, self.rng)
