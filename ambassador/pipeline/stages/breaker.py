"""The circuit breaker: after enough consecutive failures nothing is sent for a while."""

from __future__ import annotations

from attrs import define, field
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ambassador.exchange import UpstreamResponse
from ambassador.problems import Problem
from ambassador.pipeline.resilience import whole_seconds
from ambassador.pipeline.stages import ATTEMPT_FAILURES, Call, Stage

log = Logger(namespace="ambassador")
CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"
# Upstream answers that count as failures.
FAILED_STATUSES = frozenset({500, 502, 503, 504})


@define
class CircuitBreaker:
    """Opens after ``failures`` consecutive upstream failures; while open, nothing is sent.

    After the open interval one probe request goes through: success closes
    the circuit, failure opens it again for twice as long (up to ``open_max``).

    Each change is one log event, never one per request: a warning when the
    circuit opens (how many failures, the last one's kind) and when a failed
    probe keeps it open ("still open", with the next interval), info when it
    closes. Going half-open is not an event of its own: the probe's outcome is.
    An attempt admitted before the circuit opened that fails after it changes
    nothing (the circuit is open already).
    """

    clock: IReactorTime
    failures: int
    open_for: float
    open_max: float
    adapter: str = "-"  # the name its log events give
    state: str = CLOSED
    _consecutive: int = field(default=0, init=False)
    _trips: int = field(default=0, init=False)
    _opened_until: float = field(default=0.0, init=False)
    _probing: bool = field(default=False, init=False)

    def admit(self) -> bool:
        """May a request go upstream now? (Half-open lets exactly one through.)"""
        if self.state == CLOSED:
            return True
        if self.state == OPEN and self.clock.seconds() >= self._opened_until:
            self.state = HALF_OPEN
        if self.state == HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def abandoned(self) -> None:
        """The admitted request never reached the upstream (refused here, or the caller left): let the next probe."""
        self._probing = False

    def retry_after(self) -> float:
        return max(1.0, self._opened_until - self.clock.seconds())

    def succeeded(self) -> None:
        if self.state != CLOSED:
            log.info("Circuit of {adapter} closed: {what} succeeded; calling it again", adapter=self.adapter,
                     what="the probe" if self.state == HALF_OPEN else "an upstream call")
        self.state, self._consecutive, self._trips, self._probing = CLOSED, 0, 0, False

    def failed(self, why: str) -> None:
        """An attempt reached for the upstream and failed; ``why`` says how (a problem kind, a status)."""
        if self.state == OPEN:
            return
        self._consecutive += 1
        probe = self.state == HALF_OPEN
        if probe or (self.failures and self._consecutive >= self.failures):
            self._trips += 1
            seconds = min(self.open_max, self.open_for * 2 ** (self._trips - 1))
            self.state, self._probing = OPEN, False
            self._opened_until = self.clock.seconds() + seconds
            if probe:
                log.warn("Circuit of {adapter} still open: the probe failed ({why}); not calling it for {seconds:g} s",
                         adapter=self.adapter, why=why, seconds=seconds)
            else:
                log.warn("Circuit of {adapter} opened after {failures} consecutive failures (last: {why}); "
                         "not calling it for {seconds:g} s", adapter=self.adapter, failures=self._consecutive,
                         why=why, seconds=seconds)


@define
class Breaker:
    next: Stage
    breaker: CircuitBreaker

    async def __call__(self, call: Call) -> UpstreamResponse:
        breaker = self.breaker
        if not breaker.admit():
            raise circuit_open(call.adapter.name, breaker.retry_after())
        try:
            response = await self.next(call)
        except Problem as problem:
            if problem.kind in ATTEMPT_FAILURES:
                breaker.failed(problem.kind)
            else:
                breaker.abandoned()
            raise
        except defer.CancelledError:
            breaker.abandoned()
            raise
        if response.status in FAILED_STATUSES:
            breaker.failed(f"status {response.status}")
        else:
            breaker.succeeded()
        return response


def circuit_open(adapter: str, retry_after: float) -> Problem:
    return Problem(503, "circuit-open", "Circuit open",
                   f"Recent calls to the {adapter} service kept failing, so the ambassador is not calling it "
                   "for a while (circuit breaker); retry later.",
                   headers=[("Retry-After", whole_seconds(retry_after))])
