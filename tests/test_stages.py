"""Each exchange stage on its own, in process: the stage under test wraps a scripted inner stage (the rest of
the chain), and time is a Clock. How the stages behave together over HTTP is in test_resilience.py."""

from __future__ import annotations

import random

import pytest
from attrs import define, field
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent

from ambassador.exchange import Trace, UpstreamRequest, UpstreamResponse
from ambassador.pipeline.guard import Guard
from ambassador.pipeline.resilience import Policy
from ambassador.pipeline.stages import Call
from ambassador.pipeline.stages.breaker import CLOSED, OPEN, Breaker, CircuitBreaker
from ambassador.pipeline.stages.concurrency import Concurrency
from ambassador.pipeline.stages.credential import Credential
from ambassador.pipeline.stages.deadline import Deadline
from ambassador.pipeline.stages.ratelimit import RateLimit
from ambassador.pipeline.stages.retry import Retry
from ambassador.pipeline.stages.send import Send
from ambassador.problems import Problem


class Ceiling(random.Random):
    def uniform(self, a, b):
        return b


@define
class Counter:
    value: int = 0

    def inc(self) -> None:
        self.value += 1


@define
class Inner:
    """The rest of the chain: answers each call with the next of ``script`` (a status, a Problem, or a
    Deferred to wait on), and records the calls it was given."""

    script: list = field(factory=list)
    calls: list = field(factory=list)

    async def __call__(self, call: Call) -> UpstreamResponse:
        self.calls.append(call)
        step = self.script.pop(0) if self.script else 200
        if isinstance(step, defer.Deferred):
            step = await step
        if isinstance(step, Exception):
            raise step
        status, headers = step if isinstance(step, tuple) else (step, {})
        return UpstreamResponse(status, headers, b"")


@define
class Adapter:
    credential: object = None
    name: str = "api"
    base_url: str = "http://127.0.0.1:1"


def a_call(method="GET", deadline=100.0, credential=None) -> Call:
    return Call(Adapter(credential), UpstreamRequest(method, "/x"), Trace(), deadline=deadline)


def run(stage, call) -> defer.Deferred:
    return defer.ensureDeferred(stage(call))


def unreachable() -> Problem:
    return Problem(502, "upstream-unreachable", "Upstream unreachable", "Calling it: connection refused.")


def test_the_deadline_is_set_once_for_the_whole_exchange():
    clock, inner = Clock(), Inner()
    clock.advance(10)
    run(Deadline(inner, 3.0, clock), a_call(deadline=0))
    assert inner.calls[0].deadline == 13.0


def test_retry_backs_off_exponentially_and_stops_at_an_answer_that_is_not_retried():
    clock, inner, retried = Clock(), Inner([503, 502, 404]), Counter()
    stage = Retry(inner, Policy(retries=5, backoff_base=0.25), clock, Ceiling(), retried)
    answered = run(stage, a_call())
    assert len(inner.calls) == 1
    clock.advance(0.25)
    assert len(inner.calls) == 2
    clock.advance(0.25)
    assert len(inner.calls) == 2  # the second wait is twice the first
    clock.advance(0.25)
    assert len(inner.calls) == 3 and answered.result.status == 404 and retried.value == 2


def test_retry_never_repeats_a_post_or_a_refusal_of_our_own():
    clock = Clock()
    post = Inner([503])
    assert run(Retry(post, Policy(retries=3), clock, Ceiling(), Counter()), a_call("POST")).result.status == 503
    refused = Inner([Problem(429, "rate-limited", "Rate limit reached", "x")])
    failed = run(Retry(refused, Policy(retries=3), clock, Ceiling(), Counter()), a_call())
    assert failed.result.value.kind == "rate-limited" and len(refused.calls) == 1
    failed.addErrback(lambda _: None)


def test_retry_gives_a_429_to_the_caller_with_retry_after_when_the_wait_would_pass_the_deadline():
    clock, inner = Clock(), Inner([(429, {"retry-after": "7"})])
    answered = run(Retry(inner, Policy(retries=3, retry_after_cap=60), clock, Ceiling(), Counter()), a_call(deadline=5))
    assert answered.result.status == 429 and answered.result.headers["retry-after"] == "7"
    assert not clock.getDelayedCalls()


def test_the_breaker_opens_after_failures_and_a_refusal_of_our_own_frees_the_half_open_probe():
    clock = Clock()
    breaker = CircuitBreaker(clock, failures=2, open_for=10, open_max=60)
    inner = Inner([unreachable(), 503, Problem(503, "concurrency-limit", "Too many", "x"), 200])
    stage = Breaker(inner, breaker)
    for _ in range(2):
        run(stage, a_call()).addErrback(lambda _: None)
    assert breaker.state == OPEN
    refused = run(stage, a_call())
    assert refused.result.value.kind == "circuit-open" and len(inner.calls) == 2
    refused.addErrback(lambda _: None)
    clock.advance(10)
    run(stage, a_call()).addErrback(lambda _: None)  # the probe is refused here, not by the upstream
    assert breaker.state != OPEN
    assert run(stage, a_call()).result.status == 200 and breaker.state == CLOSED


def circuit_events(events) -> list[str]:
    return [formatEvent(e) for e in events if formatEvent(e).startswith("Circuit of")]


def test_each_change_of_the_circuit_is_one_log_event_not_one_per_request(clock, log_events):
    breaker = CircuitBreaker(clock, failures=2, open_for=10, open_max=60, adapter="tmdb")
    late = defer.Deferred()
    inner = Inner([late, unreachable(), 503, Problem(504, "upstream-timeout", "Timed out", "x"), 200, 200])
    stage = Breaker(inner, breaker)
    in_flight = run(stage, a_call())  # admitted while closed, fails after the circuit opened
    for _ in range(2):
        run(stage, a_call()).addErrback(lambda _: None)
    late.callback(502)
    for _ in range(3):  # refused while open: no event
        run(stage, a_call()).addErrback(lambda _: None)
    assert circuit_events(log_events) == [
        "Circuit of tmdb opened after 2 consecutive failures (last: status 503); not calling it for 10 s"]
    assert in_flight.result.status == 502 and breaker.retry_after() == 10  # it did not trip again
    clock.advance(10)
    run(stage, a_call()).addErrback(lambda _: None)  # the probe times out
    clock.advance(20)
    assert run(stage, a_call()).result.status == 200  # the next probe
    assert run(stage, a_call()).result.status == 200
    assert circuit_events(log_events)[1:] == [
        "Circuit of tmdb still open: the probe failed (upstream-timeout); not calling it for 20 s",
        "Circuit of tmdb closed: the probe succeeded; calling it again"]
    opened, still_open, closed = [e for e in log_events if formatEvent(e).startswith("Circuit of")]
    assert (opened["log_level"], still_open["log_level"], closed["log_level"]) == (
        LogLevel.warn, LogLevel.warn, LogLevel.info)
    assert (opened["adapter"], opened["failures"], opened["why"]) == ("tmdb", 2, "status 503")


def test_a_caller_who_leaves_frees_the_half_open_probe():
    clock = Clock()
    breaker = CircuitBreaker(clock, failures=1, open_for=1, open_max=1)
    hanging = defer.Deferred()
    inner = Inner([unreachable(), hanging, 200])
    stage = Breaker(inner, breaker)
    run(stage, a_call()).addErrback(lambda _: None)
    clock.advance(1)
    probe = run(stage, a_call())
    probe.addErrback(lambda f: f.trap(defer.CancelledError))
    probe.cancel()
    assert run(stage, a_call()).result.status == 200


@define
class Rotating:
    """A credential whose every attach puts a new token on the request."""

    issued: int = 0

    def attach(self, request, adapter):
        self.issued += 1
        return defer.succeed(request.with_headers({"Authorization": f"Bearer {self.issued}"}))

    def rejected(self, sent):
        return True


def test_the_credential_is_attached_to_each_attempt_and_refreshed_once_after_a_401():
    credential, inner = Rotating(), Inner([401, 401])
    call = a_call(credential=credential)
    answered = run(Credential(inner), call)
    assert answered.result.status == 401  # the second 401 goes to the adapter: one refresh only
    assert [c.request.headers["Authorization"] for c in inner.calls] == ["Bearer 1", "Bearer 2"]
    assert call.request.headers == {}  # the request the exchange started with never holds the credential


def rate_stage(inner, clock, **policy):
    policy = Policy(**policy)
    bucket = Guard.of(policy, clock).bucket
    return RateLimit(inner, bucket, policy, clock, Counter(), Counter()), bucket


def test_the_rate_limit_refuses_at_once_what_could_not_be_sent_within_the_queue():
    clock, inner = Clock(), Inner()
    stage, _ = rate_stage(inner, clock, rate_limit=2, rate_burst=1, rate_queue=1)
    first, second, third, fourth = (run(stage, a_call()) for _ in range(4))
    assert first.called and not second.called and not third.called  # 0.5 s and 1 s away: they wait
    assert fourth.called and fourth.result.value.status == 429  # 1.5 s away: refused now, not after 1 s
    assert list(fourth.result.value.headers) == [("Retry-After", "2")]
    fourth.addErrback(lambda _: None)
    clock.advance(1)
    assert second.called and third.called and len(inner.calls) == 3


def test_by_default_the_rate_limit_keeps_nobody_waiting():
    clock, inner = Clock(), Inner()
    stage, _ = rate_stage(inner, clock, rate_limit=40, rate_burst=2)
    first, second, third = (run(stage, a_call()) for _ in range(3))
    assert first.called and second.called and len(inner.calls) == 2  # the burst
    assert third.called and third.result.value.status == 429  # 25 ms from a token: refused now, not queued
    assert "none is free for this request now" in third.result.value.detail
    assert list(third.result.value.headers) == [("Retry-After", "1")]
    clock.advance(0.025)
    assert run(stage, a_call()).called and len(inner.calls) == 3  # the next token, one interval later


@pytest.mark.parametrize("status", [429, 503])
def test_a_429_or_503_with_retry_after_holds_back_every_later_request(status):
    clock, inner = Clock(), Inner([(status, {"retry-after": "3"})])
    stage, _ = rate_stage(inner, clock, rate_limit=100, rate_burst=10, rate_queue=5)
    run(stage, a_call())
    later = run(stage, a_call())
    clock.advance(2.9)
    assert not later.called
    clock.advance(0.2)
    assert later.called and len(inner.calls) == 2


def test_the_in_flight_cap_queues_briefly_then_refuses_and_gives_slots_back_on_failure():
    clock, hanging = Clock(), defer.Deferred()
    inner = Inner([hanging, unreachable()])
    policy = Policy(max_in_flight=1, in_flight_queue=0.5)
    rejected = Counter()
    stage = Concurrency(inner, defer.DeferredSemaphore(1), policy, clock, rejected)
    first, second = run(stage, a_call()), run(stage, a_call())
    clock.advance(0.5)
    assert second.result.value.kind == "concurrency-limit" and rejected.value == 1
    second.addErrback(lambda _: None)
    hanging.callback(200)
    assert first.result.status == 200
    failed = run(stage, a_call())  # the slot came back: this one reaches the upstream, and fails
    assert failed.result.value.kind == "upstream-unreachable"
    failed.addErrback(lambda _: None)
    assert run(stage, a_call()).result.status == 200  # and so did its slot


@pytest.mark.parametrize("left", [0.0, -1.0])
def test_send_makes_no_attempt_once_the_deadline_has_passed(left):
    clock = Clock()
    clock.advance(50)
    call = a_call(deadline=50 + left)
    failed = run(Send(None, Policy(timeout=7), clock, None), call)
    assert failed.result.value.status == 504 and "7 s deadline" in failed.result.value.detail
    assert call.trace.attempts == 0
    failed.addErrback(lambda _: None)
