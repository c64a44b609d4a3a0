"""Timeouts, retries, Retry-After, rate limit, circuit breaker, in-flight cap and graceful stop.

Over real HTTP against a fault-injecting fake TMDB; every wait runs on a Clock.
Each test counts the upstream attempts: no retry storms.
"""

import json
import random
from email.utils import formatdate

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock, deferLater

from twisted.python.failure import Failure

from ambassador.pipeline.resilience import Policy, retry_after_seconds
from ambassador.pipeline.stages.ratelimit import RateLimited, TokenBucket
from conftest import connect_raw, get, header, parse_response, reactor_turns_until, tmdb_env

KEY = {"TMDB_API_KEY": "test-api-key"}
JSON = {"Content-Type": "application/json"}


class Ceiling(random.Random):
    """Full jitter that always picks the ceiling, so backoff waits are exact."""

    def uniform(self, a, b):
        return b


def answer(status, **headers):
    return (status, {**JSON, **headers}, json.dumps({"status_code": 0, "status_message": "x"}).encode())


async def start(start_ambassador, fake, clock, **policy):
    # Backoff steps that are exact in binary, so clock sums land exactly on them. No cache:
    # these tests send the same request many times and count what reaches the upstream.
    policy = {"backoff_base": 0.125, **policy}
    return await start_ambassador(tmdb_env(fake, **KEY), clock=clock, rng=Ceiling(),
                                  policies={"tmdb": Policy(**policy)}, cache_bytes=None)


def call(ambassador, path="/movies"):
    return ensureDeferred(get(ambassador.url + path))


def waiting_to_retry(clock) -> bool:
    """A backoff or Retry-After wait is scheduled (deferLater), not just an attempt's timeout."""
    return any(getattr(call.func, "__name__", "") == "callback" for call in clock.getDelayedCalls())


async def after_attempt(fake, clock, number, seconds):
    """Once attempt ``number`` has been answered and a retry is scheduled, advance ``seconds``."""
    await reactor_turns_until(lambda: len(fake.requests) == number and waiting_to_retry(clock))
    clock.advance(seconds)


@pytest_twisted.ensureDeferred
async def test_retries_502_and_503_with_exponential_backoff_then_succeeds(fake_tmdb, start_ambassador, clock):
    ambassador = await start(start_ambassador, fake_tmdb, clock)
    fake_tmdb.script = [answer(503), answer(502)]
    response = call(ambassador)
    await after_attempt(fake_tmdb, clock, 1, 0.0625)
    await reactor_turns_until(lambda: True)
    assert len(fake_tmdb.requests) == 1
    clock.advance(0.0625)  # first backoff ceiling: the base, 0.125 s
    await after_attempt(fake_tmdb, clock, 2, 0.125)
    assert len(fake_tmdb.requests) == 2
    clock.advance(0.125)  # second: twice that
    result, body = await response
    assert result.code == 200 and json.loads(body)["results"]
    assert len(fake_tmdb.requests) == 3


@pytest.mark.parametrize("canned", [answer(404), answer(400), answer(401), answer(500, **{"Content-Type": "text/html"})])
@pytest_twisted.ensureDeferred
async def test_no_retry_for_caller_errors_or_credential_rejections(fake_tmdb, start_ambassador, clock, canned):
    ambassador = await start(start_ambassador, fake_tmdb, clock)
    fake_tmdb.canned = (401, JSON, b'{"status_code": 7}') if canned[0] == 401 else canned
    result, _ = await call(ambassador)
    assert result.code in (400, 404, 502)
    assert len(fake_tmdb.requests) == 1


@pytest_twisted.ensureDeferred
async def test_retries_stop_after_the_configured_number(fake_tmdb, start_ambassador, clock):
    ambassador = await start(start_ambassador, fake_tmdb, clock, retries=3)
    fake_tmdb.fault = "reset"
    response = call(ambassador)
    for number in (1, 2, 3):
        await after_attempt(fake_tmdb, clock, number, 2)
    result, body = await response
    assert result.code == 502 and json.loads(body)["type"].endswith("upstream-unreachable")
    assert len(fake_tmdb.requests) == 4


@pytest_twisted.ensureDeferred
async def test_retry_after_seconds_is_honoured_on_429(fake_tmdb, start_ambassador, clock):
    ambassador = await start(start_ambassador, fake_tmdb, clock)
    fake_tmdb.script = [answer(429, **{"Retry-After": "2"})]
    response = call(ambassador)
    await after_attempt(fake_tmdb, clock, 1, 1.5)
    assert len(fake_tmdb.requests) == 1
    clock.advance(0.5)
    result, _ = await response
    assert result.code == 200 and len(fake_tmdb.requests) == 2


@pytest_twisted.ensureDeferred
async def test_retry_after_http_date_is_honoured_on_503(fake_tmdb, start_ambassador, clock):
    ambassador = await start(start_ambassador, fake_tmdb, clock)
    fake_tmdb.script = [answer(503, **{"Retry-After": formatdate(clock.seconds() + 3, usegmt=True)})]
    response = call(ambassador)
    await after_attempt(fake_tmdb, clock, 1, 2.5)
    assert len(fake_tmdb.requests) == 1
    clock.advance(0.5)
    assert (await response)[0].code == 200


@pytest.mark.parametrize(
    "why, timeout, status, asked, kind",
    [
        ("the wait would pass the deadline: our own Retry-After", 3, 429, "4", "upstream-rate-limited"),
        ("the wait is beyond retry_after_cap: not waited for", 60, 503, "30", "upstream-unavailable"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_retry_after_that_cannot_be_waited_for_goes_to_the_caller(fake_tmdb, start_ambassador, clock, why,
                                                                        timeout, status, asked, kind):
    ambassador = await start(start_ambassador, fake_tmdb, clock, timeout=timeout)
    fake_tmdb.canned = answer(status, **{"Retry-After": asked})
    result, body = await call(ambassador)
    assert result.code == status and header(result, "retry-after") == asked
    assert json.loads(body)["type"].endswith(kind)
    assert len(fake_tmdb.requests) == 1


@pytest_twisted.ensureDeferred
async def test_deadline_covers_every_attempt(fake_tmdb, start_ambassador, clock):
    ambassador = await start(start_ambassador, fake_tmdb, clock, timeout=10, attempt_timeout=4)
    fake_tmdb.fault = "hang"
    response = call(ambassador)
    await reactor_turns_until(lambda: len(fake_tmdb.requests) == 1)
    clock.advance(4)  # attempt 1 times out
    await after_attempt(fake_tmdb, clock, 1, 0.125)  # the backoff
    await reactor_turns_until(lambda: len(fake_tmdb.requests) == 2)
    clock.advance(4)  # attempt 2 times out at 8.125 s
    await after_attempt(fake_tmdb, clock, 2, 0.25)
    await reactor_turns_until(lambda: len(fake_tmdb.requests) == 3)
    clock.advance(1.625)  # attempt 3 gets only what is left of the 10 s
    result, body = await response
    assert result.code == 504 and "within 1.625 s" in json.loads(body)["detail"]
    assert len(fake_tmdb.requests) == 3


@pytest_twisted.ensureDeferred
async def test_timed_out_attempt_is_retried(fake_tmdb, start_ambassador, clock):
    ambassador = await start(start_ambassador, fake_tmdb, clock, attempt_timeout=2)
    fake_tmdb.script = ["hang"]
    response = call(ambassador)
    await reactor_turns_until(lambda: len(fake_tmdb.requests) == 1)
    clock.advance(2)
    await after_attempt(fake_tmdb, clock, 1, 0.125)
    result, _ = await response
    assert result.code == 200 and len(fake_tmdb.requests) == 2


@pytest_twisted.ensureDeferred
async def test_rate_limit_queues_then_rejects_with_retry_after(fake_tmdb, start_ambassador, clock):
    ambassador = await start(start_ambassador, fake_tmdb, clock, rate_limit=2, rate_burst=2, rate_queue=1)
    calls = [call(ambassador) for _ in range(5)]
    await reactor_turns_until(lambda: sum(c.called for c in calls) == 3)  # the burst of 2, and one refused
    assert len(fake_tmdb.requests) == 2
    answered = {c: await c for c in calls if c.called}
    [refused] = [c for c, (result, _) in answered.items() if result.code == 429]  # whichever arrived fifth
    rejected, body = answered[refused]
    assert rejected.code == 429 and header(rejected, "retry-after") == "2"
    assert "at most 2 requests per second" in json.loads(body)["detail"]
    clock.advance(0.5)
    await reactor_turns_until(lambda: len(fake_tmdb.requests) == 3)
    clock.advance(0.5)
    await reactor_turns_until(lambda: len(fake_tmdb.requests) == 4)
    assert [(await c)[0].code for c in calls if c is not refused] == [200] * 4


async def settle(turns=50):
    """Let loopback I/O in flight finish (no time passes on the test's Clock)."""
    for _ in range(turns):
        await deferLater(reactor, 0, lambda: None)


@pytest_twisted.ensureDeferred
async def test_a_429_storm_never_pushes_the_upstream_past_the_rate(fake_tmdb, start_ambassador, clock):
    ambassador = await start(start_ambassador, fake_tmdb, clock, rate_limit=5, rate_burst=5, rate_queue=1,
                             timeout=30, retries=5)
    fake_tmdb.canned = answer(429)  # no Retry-After: backoff and the bucket decide
    calls = [call(ambassador) for _ in range(20)]
    seen = []
    for _ in range(60):  # 6 s in steps of 0.125 s
        await settle()
        seen.append(len(fake_tmdb.requests))
        clock.advance(0.125)
    while not all(c.called for c in calls):
        clock.advance(1)
        await settle()
    codes = {(await c)[0].code for c in calls}
    assert codes == {429}
    # In any 1 s window (8 steps) at most the burst plus one second's worth of the rate.
    windows = [seen[k + 8] - seen[k] for k in range(len(seen) - 8)]
    assert max(windows) <= 5 + 5
    assert seen[-1] <= 5 + 5 * 6
    assert seen[-1] > 5  # retries did happen, at the rate


@pytest_twisted.ensureDeferred
async def test_upstream_retry_after_on_429_holds_every_request(fake_tmdb, start_ambassador, clock):
    ambassador = await start(start_ambassador, fake_tmdb, clock, rate_limit=10, rate_queue=5, retries=0)
    fake_tmdb.script = [answer(429, **{"Retry-After": "3"})]
    first, _ = await call(ambassador)
    assert first.code == 429
    second = call(ambassador)
    await reactor_turns_until(lambda: clock.getDelayedCalls())
    clock.advance(2.5)
    await reactor_turns_until(lambda: True)
    assert len(fake_tmdb.requests) == 1  # nobody calls before TMDB said we may
    clock.advance(0.5)
    assert (await second)[0].code == 200


@pytest_twisted.ensureDeferred
async def test_circuit_opens_fails_fast_probes_and_closes(fake_tmdb, start_ambassador, clock):
    ambassador = await start(start_ambassador, fake_tmdb, clock, retries=0, breaker_failures=3,
                             breaker_open=10, breaker_open_max=60)
    fake_tmdb.fault = "reset"
    for _ in range(3):
        assert (await call(ambassador))[0].code == 502
    result, body = await call(ambassador)
    assert result.code == 503 and header(result, "retry-after") == "10"
    assert json.loads(body)["type"].endswith("circuit-open")
    assert len(fake_tmdb.requests) == 3  # answered without touching the upstream
    ready, report = await get(ambassador.admin_url + "/upstreams")  # the outside world's state: not readiness
    assert ready.code == 200 and b"circuit open" in report
    assert (await get(ambassador.admin_url + "/readyz"))[0].code == 200
    assert await circuit_states(ambassador) == {"closed": 0, "open": 1, "half_open": 0}

    clock.advance(10)
    assert (await call(ambassador))[0].code == 502  # the one probe, failing: open for 20 s now
    assert len(fake_tmdb.requests) == 4
    clock.advance(10)
    result, _ = await call(ambassador)
    assert result.code == 503 and len(fake_tmdb.requests) == 4
    clock.advance(10)
    fake_tmdb.fault = None
    assert await circuit_states(ambassador) == {"closed": 0, "open": 1, "half_open": 0}
    assert (await call(ambassador))[0].code == 200  # the probe succeeds: closed
    assert (await call(ambassador))[0].code == 200
    assert len(fake_tmdb.requests) == 6
    assert await circuit_states(ambassador) == {"closed": 1, "open": 0, "half_open": 0}


async def circuit_states(ambassador) -> dict[str, float]:
    """ambassador_circuit_state of the tmdb adapter, by state."""
    _, exposition = await get(ambassador.admin_url + "/metrics")
    return {s.labels["state"]: s.value for f in text_string_to_metric_families(exposition.decode())
            for s in f.samples if s.name == "ambassador_circuit_state" and s.labels["adapter"] == "tmdb"}


@pytest_twisted.ensureDeferred
async def test_in_flight_cap_queues_briefly_then_503(fake_tmdb, start_ambassador, clock):
    ambassador = await start(start_ambassador, fake_tmdb, clock, max_in_flight=2, in_flight_queue=0.5)
    fake_tmdb.fault = "hang"
    calls = [call(ambassador) for _ in range(3)]
    await reactor_turns_until(lambda: len(fake_tmdb.requests) == 2 and len(clock.getDelayedCalls()) >= 3)
    clock.advance(0.5)
    await reactor_turns_until(lambda: any(c.called for c in calls))
    [queued] = [c for c in calls if c.called]  # whichever arrived third
    result, body = await queued
    assert result.code == 503 and json.loads(body)["type"].endswith("concurrency-limit")
    fake_tmdb.release()
    assert [(await c)[0].code for c in calls if c is not queued] == [200, 200]
    assert len(fake_tmdb.requests) == 2


@pytest_twisted.ensureDeferred
async def test_graceful_stop_finishes_requests_in_flight_and_refuses_new_ones(fake_tmdb, start_ambassador, clock):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, **KEY), clock=clock, grace_period=25)
    fake_tmdb.fault = "hang"
    in_flight = await connect_raw(ambassador.url)
    in_flight.transport.write(b"GET /movies HTTP/1.1\r\nHost: localhost\r\n\r\n")  # on a kept-alive connection
    await fake_tmdb.next_request()
    stopped = ambassador.service.stopService()
    with pytest.raises(Exception):
        await get(ambassador.url + "/movies")  # no longer accepting
    assert not stopped.called
    fake_tmdb.release()
    await reactor_turns_until(lambda: in_flight.received.count(b"\r\n\r\n") == 1 and in_flight.received.endswith(b"}"))
    status, headers, _ = parse_response(in_flight.received)
    assert status == 200 and headers["connection"] == "close"  # so the caller reconnects elsewhere
    await reactor_turns_until(lambda: in_flight.closed.called)  # and the ambassador closed it
    await stopped


@pytest_twisted.ensureDeferred
async def test_graceful_stop_gives_up_after_the_grace_period(fake_tmdb, start_ambassador, clock):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, **KEY), clock=clock, grace_period=25,
                                        policies={"tmdb": Policy(timeout=60)})
    fake_tmdb.fault = "hang"
    in_flight = call(ambassador)
    await fake_tmdb.next_request()
    stopped = []
    ambassador.proxy.stopService().addCallback(stopped.append)  # the listener: stop accepting, drain
    await reactor_turns_until(lambda: waiting_for_drain(clock))
    clock.advance(24.5)
    assert not stopped
    clock.advance(0.5)
    assert stopped  # gave up on the request still in flight
    fake_tmdb.release()
    assert (await in_flight)[0].code == 200


def waiting_for_drain(clock) -> bool:
    return any(call.getTime() - clock.seconds() == 25 for call in clock.getDelayedCalls())


def test_retry_after_values():
    assert retry_after_seconds("7", 0) == 7
    assert retry_after_seconds(formatdate(1000, usegmt=True), 990) == 10
    assert retry_after_seconds(formatdate(1000, usegmt=True), 2000) == 0
    assert retry_after_seconds("soon", 0) is None and retry_after_seconds(None, 0) is None


def test_token_bucket_allows_burst_then_rate():
    clock = Clock()
    bucket = TokenBucket(clock, rate=8, burst=3, max_wait=0.3)
    results: dict[int, object] = {}
    for n in range(6):
        bucket.acquire().addBoth(lambda result, n=n: results.__setitem__(n, result))
    assert [results[n] for n in range(3)] == [0.0, 0.0, 0.0]  # the burst
    assert 3 not in results and 4 not in results  # waiting for the rate
    assert isinstance(results[5], Failure) and results[5].check(RateLimited)  # 0.375 s > 0.3 s: refused now
    clock.advance(0.125)
    assert results[3] == 0.125 and 4 not in results
    clock.advance(0.125)
    assert results[4] == 0.25


@pytest_twisted.ensureDeferred
async def test_a_caller_who_hangs_up_is_neither_a_failure_nor_retried(fake_tmdb, start_ambassador, clock,
                                                                      log_events):
    ambassador = await start(start_ambassador, fake_tmdb, clock, breaker_failures=2, retries=2)
    fake_tmdb.fault = "hang"
    for n in range(1, 4):
        leaving = call(ambassador)
        await reactor_turns_until(lambda: len(fake_tmdb.hanging) == n)
        leaving.cancel()  # the caller closes its connection
        leaving.addErrback(lambda _: None)  # its request failed as cancelled: nobody reads that
        await reactor_turns_until(lambda: fake_tmdb.hanging[-1]._disconnected)
    assert not waiting_to_retry(clock) and len(fake_tmdb.requests) == 3
    fake_tmdb.fault = None
    response, _ = await get(ambassador.url + "/movies")
    assert response.code == 200  # the circuit never opened
    _, metrics = await get(ambassador.admin_url + "/metrics")
    assert b'ambassador_upstream_attempts_total{adapter="tmdb",outcome="cancelled"} 3.0' in metrics
    assert b'ambassador_upstream_attempts_total{adapter="tmdb",outcome="unreachable"} 0.0' in metrics
    # logged and counted as nginx does: 499, the caller closed the request
    assert [e["status"] for e in log_events if e.get("log_namespace") == "ambassador.access"] == [499] * 3 + [200]
    assert b'ambassador_requests_total{adapter="tmdb",code_class="4xx",route="movies"} 3.0' in metrics
    assert b'ambassador_requests_in_flight{adapter="tmdb"} 0.0' in metrics


OUTCOMES = {  # what the upstream does with the first attempt, and the retries the policy allows
    "answered": ([], 0),
    "not found": ([answer(404)], 0),
    "connection reset": (["reset"], 0),
    "503": ([answer(503)], 0),
    "timed out": (["hang"], 0),
    "retried": ([answer(503)], 1),
    "caller hung up": (["hang"], 0),
    "caller hung up during the backoff": ([answer(503)], 1),
}


@pytest.mark.parametrize("outcome", OUTCOMES)
@pytest_twisted.ensureDeferred
async def test_every_outcome_gives_the_in_flight_slot_back(fake_tmdb, start_ambassador, clock, outcome):
    # One slot: the request after this one goes upstream at once (no time passes) only if it came back.
    script, retries = OUTCOMES[outcome]
    ambassador = await start(start_ambassador, fake_tmdb, clock, max_in_flight=1, retries=retries, attempt_timeout=2)
    fake_tmdb.script = list(script)
    first = call(ambassador)
    if outcome == "timed out":
        await reactor_turns_until(lambda: len(fake_tmdb.hanging) == 1)
        clock.advance(2)
    elif outcome == "retried":
        await after_attempt(fake_tmdb, clock, 1, 0.125)
    elif outcome.startswith("caller hung up"):
        await reactor_turns_until(lambda: fake_tmdb.hanging or waiting_to_retry(clock))
        first.cancel()
        first.addErrback(lambda _: None)
        await reactor_turns_until(lambda: all(request._disconnected for request in fake_tmdb.hanging))
        await settle()
        assert not waiting_to_retry(clock)  # nothing is sent for a caller who left
    if not outcome.startswith("caller hung up"):
        await reactor_turns_until(lambda: first.called)  # a slot never given back fails here, not hangs
        result, _ = await first
        assert result.code == {"answered": 200, "not found": 404, "connection reset": 502, "503": 503,
                               "timed out": 504, "retried": 200}[outcome]
    attempts = len(fake_tmdb.requests)
    assert attempts == (2 if outcome == "retried" else 1)
    following = call(ambassador)
    await reactor_turns_until(lambda: following.called)
    assert (await following)[0].code == 200 and len(fake_tmdb.requests) == attempts + 1
