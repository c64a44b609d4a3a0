"""The in-flight cap: at most ``max_in_flight`` attempts at once per adapter, a short queue, then 503."""

from __future__ import annotations

from attrs import define
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from ambassador.exchange import UpstreamResponse
from ambassador.problems import Problem
from ambassador.pipeline.resilience import Policy
from ambassador.pipeline.stages import Call, Counted, Stage


@define
class Concurrency:
    next: Stage
    slots: defer.DeferredSemaphore
    policy: Policy
    clock: IReactorTime
    rejections: Counted  # the adapter's

    async def __call__(self, call: Call) -> UpstreamResponse:
        slot = self.slots.acquire()
        if not slot.called:  # no timer for a free slot
            slot.addTimeout(self.policy.in_flight_queue, self.clock)
        try:
            await slot
        except defer.TimeoutError:
            self.rejections.inc()
            raise too_many_in_flight(call.adapter.name, self.policy) from None
        try:
            return await self.next(call)
        finally:
            self.slots.release()


def too_many_in_flight(adapter: str, policy: Policy) -> Problem:
    return Problem(503, "concurrency-limit", "Too many requests in flight",
                   f"{policy.max_in_flight} requests to the {adapter} service are already in flight and no slot "
                   f"freed within {policy.in_flight_queue:g} s; retry shortly.",
                   headers=[("Retry-After", "1")])
