"""The deadline: the policy's ``timeout`` covers the whole exchange, every attempt and wait included."""

from __future__ import annotations

from attrs import define
from twisted.internet.interfaces import IReactorTime

from ambassador.exchange import UpstreamResponse
from ambassador.interfaces import IExternalAdapter
from ambassador.problems import Problem
from ambassador.pipeline.stages import Call, Stage


@define
class Deadline:
    next: Stage
    timeout: float
    clock: IReactorTime

    async def __call__(self, call: Call) -> UpstreamResponse:
        call.deadline = self.clock.seconds() + self.timeout
        return await self.next(call)


def deadline_passed(adapter: IExternalAdapter, timeout: float) -> Problem:
    return Problem(
        504,
        "upstream-timeout",
        "Upstream timed out",
        f"The {adapter.name} service did not answer completely within the "
        f"{timeout:g} s deadline (all attempts included).",
    )
