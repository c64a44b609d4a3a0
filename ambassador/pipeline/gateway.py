"""The upstream pipeline: one HTTP client for the process, and the steps every request takes.

Adapters describe requests; this module executes them: credential, timeout,
the call itself, and the mapping of network failures to problem answers.
"""

from __future__ import annotations

import math
import random
from functools import partial

from attrs import evolve
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from ambassador.cache.responses import CACHE_NAME, CallerWish, ResponseCache, Served, cache_key
from ambassador.pipeline.client import DEFAULT_MAX_RESPONSE_BYTES, ResponseTooLarge, UpstreamClient, UpstreamFailed
from ambassador.exchange import Answer, InboundRequest, Trace, UpstreamRequest, UpstreamResponse
from ambassador.app.health import Readiness
from ambassador.interfaces import IExternalAdapter
from ambassador.metrics import Metrics, UpstreamMetrics
from ambassador.problems import Problem
from ambassador.pipeline.resilience import (
    CLOSED,
    Guard,
    Policy,
    RateLimited,
    circuit_open,
    full_jitter_backoff,
    rate_limited,
    retry_after_seconds,
    too_many_in_flight,
    whole_seconds,
)

class Gateway:
    """Runs one inbound request through an adapter and the upstream pipeline.

    GET and HEAD go through the response ``cache`` first, when there is one.
    Per adapter it enforces the resilience policy (``guards``): deadline,
    circuit breaker, rate limit, in-flight cap, retries with backoff and
    Retry-After. It records each attempt in ``metrics``, what it learns about
    the credential in ``readiness``, and fills in the request's Trace.
    """

    def __init__(
        self,
        client: UpstreamClient,
        clock: IReactorTime,
        metrics: Metrics,
        readiness: Readiness,
        guards: dict[str, Guard],
        *,
        forward_request_id: frozenset[str] = frozenset(),
        rng: random.Random | None = None,
        cache: ResponseCache | None = None,
        peers=None,
    ) -> None:
        self._client = client
        self._clock = clock
        self._metrics = metrics
        self._upstream_metrics: dict[str, UpstreamMetrics] = {}  # label children bound once per adapter
        self._readiness = readiness
        self._guards = guards
        self._forward_request_id = forward_request_id
        self._rng = rng or random.Random()
        self._cache = cache
        self._peers = peers  # ambassador.cache.peers.Peers with --workers: misses of keys others own are asked of them
        self._cache_metrics: dict[str, dict] = {}  # label children bound once per adapter
        self._timeouts = Timeouts(clock)

    def answer(self, adapter: IExternalAdapter, inbound: InboundRequest, trace: Trace, *,
               for_peer: bool = False) -> Answer | defer.Deferred:
        """The Answer at once (a fresh hit in the memory cache), or a Deferred firing with it or
        failing with a Problem. Cancel the Deferred to abandon.

        ``for_peer``: ``inbound`` was forwarded by another process (``ambassador.cache.peers``); a Deferred
        firing with (Served, the Entry kept for it or None), and never forwarded again."""
        try:
            request = adapter.upstream_request(inbound)
        except Problem:
            return defer.fail()
        if inbound.request_id and adapter.name in self._forward_request_id:
            request = request.with_headers({**request.headers, "X-Request-ID": inbound.request_id})
        guard = self._guards[adapter.name]
        cacheable = request.method in ("GET", "HEAD") and not request.body
        wish = CallerWish.of(inbound.headers) if self._cache is not None and guard.policy.cache and cacheable else None
        if wish is None or wish.bypass:
            if for_peer:  # the asker forwards only what its cache would fetch: the same settings say no here
                return defer.fail(RuntimeError("a request forwarded by another process does not go through the cache"))
            answered = self._exchange(adapter, guard, request, trace, inbound)
            return answered if wish is None else answered.addCallback(_bypassed, trace)

        def fetch(conditional: dict[str, str]) -> defer.Deferred:
            sent = request.with_headers({**request.headers, **conditional}) if conditional else request
            return self._exchange(adapter, guard, sent, trace)

        key = cache_key(adapter.name, inbound.route.name, request)
        forward = None
        if self._peers is not None and not for_peer and request.method == "GET":  # the owner is sent a GET
            forward = partial(self._peers.ask, adapter, inbound, key, guard.policy.timeout)
        served = self._cache.serve(key, guard.policy, request.headers, wish, fetch,
                                   lambda response: self._interpret(response, adapter, inbound), forward)
        if for_peer:
            kept = served if isinstance(served, defer.Deferred) else defer.succeed(served)
            return kept.addCallback(lambda served: (served, self._cache.kept_for(key, served)))
        if isinstance(served, defer.Deferred):
            return served.addCallback(self._served, adapter.name, inbound, trace)
        return self._served(served, adapter.name, inbound, trace)

    def _served(self, served: Served, adapter: str, inbound: InboundRequest, trace: Trace) -> Answer:
        trace.cache = served.outcome
        if trace.upstream_status is None:
            trace.upstream_status = served.upstream_status
        counted = self._cache_metrics.get(adapter)
        if counted is None:
            counted = self._cache_metrics[adapter] = self._metrics.cache_answers_of(adapter)
        counted[served.outcome].inc()
        if served.answer.status == 200 and served.unchanged_for(inbound.headers.get("if-none-match")):
            return Answer(304, served.headers(), b"")  # the caller has this answer already
        return Answer(served.answer.status, served.headers(), served.answer.body)

    def probe(self, adapter: IExternalAdapter, path: str) -> defer.Deferred:
        """Ask the upstream for ``path``; fires with None when it answered well, else why not."""

        async def ask() -> UpstreamResponse:
            request = await self._attach(adapter, UpstreamRequest("GET", path))
            return await self._attempt(adapter, request, Trace(), self._guards[adapter.name].policy.timeout)

        call = defer.ensureDeferred(ask())
        call.addCallbacks(
            lambda response: None if response.status < 400 else f"{path} answered status {response.status}",
            lambda failure: failure.value.detail if failure.check(Problem) else failure.getErrorMessage(),
        )
        return call

    def _exchange(self, adapter, guard: Guard, request: UpstreamRequest, trace: Trace,
                  inbound: InboundRequest | None = None) -> defer.Deferred:
        """A Deferred firing with the upstream's answer to ``request`` after the policy's retries (with
        ``inbound``, the adapter's Answer to it made of that), or failing with a Problem when there is
        none. Cancel it to abandon the exchange.

        The common case waits for nothing before its first attempt: the circuit is closed, the
        credential is attached at once, a rate token and an in-flight slot are free. That attempt is
        sent from here and an answer that ends the exchange comes back through plain callbacks
        (``_first_attempted``), without a coroutine. Everything else, a wait before the first attempt,
        a fresh credential or a retry after it, goes through ``_exchange_generally``. (Each callback on
        a Deferred costs several times a plain call: the fast path's attempt has only one.)
        """
        policy, breaker, bucket, slots = guard.policy, guard.breaker, guard.bucket, guard.slots
        deadline = self._clock.seconds() + policy.timeout
        if breaker is not None and breaker.state != CLOSED:
            return self._exchanged_generally(inbound, adapter, guard, request, trace, deadline)
        try:
            sent = adapter.credential.attach(request, adapter.name)
        except Exception:
            return defer.fail()
        if not isinstance(sent, UpstreamRequest):  # a Deferred: the credential is being fetched (OAuth2)
            attached = defer.maybeDeferred(lambda: sent)
            return self._exchanged_generally(inbound, adapter, guard, request, trace, deadline, attached)
        remaining = deadline - self._clock.seconds()
        # A rate token and a slot both now, or neither: the slot is taken only once the token is.
        if remaining <= 0 or not slots.tokens or (bucket is not None and not bucket.take_now()):
            attached = defer.succeed(sent)
            return self._exchanged_generally(inbound, adapter, guard, request, trace, deadline, attached)
        slots.take_now()
        timeout = min(remaining, policy.attempt_timeout or remaining)
        call, started = self._call(adapter, sent, trace, timeout)
        return call.addBoth(self._first_attempted, call, started, timeout, adapter, guard, request, trace, deadline,
                            sent, inbound)

    def _first_attempted(self, result, call: defer.Deferred, started: float, timeout: float, adapter, guard: Guard,
                         request: UpstreamRequest, trace: Trace, deadline: float, sent: UpstreamRequest,
                         inbound: InboundRequest | None):
        """The fast path's first attempt is over: what ``_attempted``, then ``_exchange_generally`` and
        ``_interpret`` would make of it."""
        try:
            outcome = self._attempted(result, adapter, trace, call, started, timeout)
        except Exception:
            outcome = Failure()
        breaker = guard.breaker
        if isinstance(outcome, Failure):
            if outcome.check(defer.CancelledError):
                if breaker is not None:
                    breaker.abandoned()
                guard.slots.release()
                return outcome
            guard.slots.release()
            if not outcome.check(Problem):
                return outcome
            outcome = outcome.value
        else:
            guard.slots.release()
            if outcome.status < 500 and outcome.status not in (401, 429):
                # No fresh credential, no retry, nothing to hold back: the breaker's success is all.
                if breaker is not None:
                    breaker.succeeded()
                return outcome if inbound is None else self._interpret(outcome, adapter, inbound)
        return self._exchanged_generally(inbound, adapter, guard, request, trace, deadline, first=(sent, outcome))

    def _exchanged_generally(self, inbound: InboundRequest | None, adapter, guard: Guard, request: UpstreamRequest,
                             trace: Trace, deadline: float, attached: defer.Deferred | None = None,
                             first: tuple | None = None) -> defer.Deferred:
        """``_exchange_generally`` as a Deferred; with ``inbound``, of the adapter's Answer."""
        exchanged = defer.ensureDeferred(self._exchange_generally(adapter, guard, request, trace, deadline, attached,
                                                                  first))
        return exchanged if inbound is None else exchanged.addCallback(self._interpret, adapter, inbound)

    async def _exchange_generally(self, adapter, guard: Guard, request: UpstreamRequest, trace: Trace,
                                  deadline: float, attached: defer.Deferred | None = None,
                                  first: tuple | None = None) -> UpstreamResponse:
        """``_exchange`` in every case, from its start or where its fast path left it: ``attached`` is the
        credential attachment started for the first attempt, ``first`` the request sent and the outcome
        (an UpstreamResponse or a Problem) of a first attempt already made."""
        policy, breaker, name = guard.policy, guard.breaker, adapter.name
        retries_left = policy.retries if request.method in ("GET", "HEAD") else 0
        refreshable = True
        while True:
            if first is None:
                sent, outcome = await self._guarded_attempt(adapter, guard, request, trace, deadline, attached)
                attached = None
            else:
                (sent, outcome), first = first, None
            if refreshable and self._refreshed(adapter, sent, outcome):
                refreshable = False
                continue
            status = outcome.status if isinstance(outcome, UpstreamResponse) else None
            if breaker is not None:
                (breaker.failed if status is None or status in _FAILED_STATUSES else breaker.succeeded)()
            if status == 429 and guard.bucket is not None:
                asked = retry_after_seconds(outcome.headers.get("retry-after"), self._clock.seconds())
                if asked:  # nobody here sends before the upstream is willing again
                    guard.bucket.hold_until(self._clock.seconds() + asked)
            wait = self._retry_wait(outcome, guard, retries_left)
            if wait is None:
                break
            if self._clock.seconds() + wait >= deadline:
                if status in (429, 503):  # the caller may retry later: say when
                    return _with_retry_after(outcome, wait)
                break
            retries_left -= 1
            self._metrics.retries.labels(name).inc()
            await deferLater(self._clock, wait)
        if isinstance(outcome, Problem):
            raise outcome
        return outcome

    async def _guarded_attempt(self, adapter, guard: Guard, request: UpstreamRequest, trace: Trace,
                               deadline: float, attached: defer.Deferred | None) -> tuple:
        """One attempt once the breaker, the credential, the rate limit and the in-flight cap let it go:
        the request sent and its outcome, an UpstreamResponse or a Problem."""
        policy, breaker, name = guard.policy, guard.breaker, adapter.name
        if breaker is not None and breaker.rejecting():
            raise circuit_open(name, breaker.retry_after())
        sent = await (self._attach(adapter, request) if attached is None else attached)
        await self._take_rate_token(name, guard)
        await self._take_slot(name, guard)
        try:
            # The deadline is kept by giving each attempt only what is left of it;
            # the waits before an attempt are bounded by their own queue limits.
            remaining = deadline - self._clock.seconds()
            if remaining <= 0:
                raise _deadline_problem(adapter, policy)
            if breaker is not None and not breaker.admit():
                raise circuit_open(name, breaker.retry_after())
            try:
                outcome = await self._attempt(adapter, sent, trace, min(remaining, policy.attempt_timeout or remaining))
            except Problem as problem:
                outcome = problem
            except defer.CancelledError:
                if breaker is not None:
                    breaker.abandoned()
                raise
        finally:
            guard.slots.release()
        return sent, outcome

    # The credential is attached to each attempt. It may first fetch a token (OAuth2), so
    # attaching may wait; a 401 to a credential that can be refreshed is sent once more with a
    # fresh one, apart from (and before) the retry policy.

    def _attach(self, adapter: IExternalAdapter, request: UpstreamRequest) -> defer.Deferred:
        return defer.maybeDeferred(adapter.credential.attach, request, adapter.name)

    @staticmethod
    def _refreshed(adapter: IExternalAdapter, sent: UpstreamRequest, outcome) -> bool:
        return (isinstance(outcome, UpstreamResponse) and outcome.status == 401
                and adapter.credential.rejected(sent))

    def _retry_wait(self, outcome, guard: Guard, retries_left: int) -> float | None:
        """Seconds to wait before retrying ``outcome``, or None when it must not be retried."""
        if retries_left <= 0:
            return None
        policy = guard.policy
        backoff = full_jitter_backoff(policy, policy.retries - retries_left, self._rng)
        if isinstance(outcome, Problem):
            return backoff if outcome.kind in ("upstream-unreachable", "upstream-timeout") else None
        if outcome.status in (429, 503):
            asked = retry_after_seconds(outcome.headers.get("retry-after"), self._clock.seconds())
            if asked is None:
                return backoff
            return asked if asked <= policy.retry_after_cap else None
        return backoff if outcome.status in (502, 504) else None

    async def _take_rate_token(self, name: str, guard: Guard) -> None:
        if guard.bucket is None:
            return
        try:
            waited = await guard.bucket.acquire()
        except RateLimited as limited:
            self._metrics.rate_limit_rejections.labels(name).inc()
            raise rate_limited(name, guard.policy, limited.retry_after)
        if waited:
            self._metrics.rate_limit_waits.labels(name).inc()

    async def _take_slot(self, name: str, guard: Guard) -> None:
        slot = guard.slots.acquire()
        if slot.called:  # a free slot: no queue, no timer
            return
        slot.addTimeout(guard.policy.in_flight_queue, self._clock)
        try:
            await slot
        except defer.TimeoutError:
            self._metrics.concurrency_rejections.labels(name).inc()
            raise too_many_in_flight(name, guard.policy)

    def _attempt(self, adapter: IExternalAdapter, request: UpstreamRequest, trace: Trace,
                 timeout: float) -> defer.Deferred:
        """One upstream call, a Deferred firing with the UpstreamResponse; network failures and its own
        timeout come back as Problems."""
        call, started = self._call(adapter, request, trace, timeout)
        return call.addBoth(self._attempted, adapter, trace, call, started, timeout)

    def _call(self, adapter: IExternalAdapter, request: UpstreamRequest, trace: Trace,
              timeout: float) -> tuple[defer.Deferred, float]:
        """An attempt's call to the upstream, cancelled after ``timeout``, and when it started."""
        trace.attempts += 1
        started = self._clock.seconds()
        limit = getattr(adapter, "max_response_bytes", DEFAULT_MAX_RESPONSE_BYTES)
        try:
            call = self._client.fetch(adapter.base_url, request, max_body=limit)
        except Exception:  # a request the client refuses at once (a bad header) fails like any other attempt
            call = defer.fail()
        # The timeout cancels the call (which drops its connection); _attempted stops it, or sees that it
        # cancelled the call.
        self._timeouts.start(call, started + timeout)
        return call, started

    def _attempted(self, result, adapter: IExternalAdapter, trace: Trace, call: defer.Deferred, started: float,
                   timeout: float):
        """The attempt's call is over: its outcome counted, a failure explained as a Problem (raised)."""
        if not self._timeouts.stop(call):  # the call timed out: whatever came of cancelling it
            result = Failure(AttemptTimedOut())
        if isinstance(result, UpstreamResponse):
            trace.upstream_status = result.status
            outcome = f"{result.status // 100}xx"
        elif result.check(AttemptTimedOut):
            outcome = "timeout"
        elif result.check(defer.CancelledError):
            outcome = "cancelled"
        elif result.check(ResponseTooLarge):
            outcome = "too-large"
        else:
            outcome = "unreachable"
        observed = self._upstream_metrics.get(adapter.name)
        if observed is None:
            observed = self._upstream_metrics[adapter.name] = self._metrics.upstream(adapter.name)
        observed.attempted(outcome, self._clock.seconds() - started)
        return result if isinstance(result, UpstreamResponse) else self._explain_failure(result, adapter, timeout)

    def _interpret(self, response: UpstreamResponse, adapter: IExternalAdapter, inbound: InboundRequest):
        state = self._readiness[adapter.name]
        try:
            answer = adapter.interpret(inbound, response)
        except Problem as problem:
            if problem.kind == "credential-rejected":
                state.credential_rejected = True
            raise
        if answer.status < 500:
            state.credential_rejected = False  # the upstream took the credential
        return answer

    def _explain_failure(self, failure, adapter: IExternalAdapter, timeout: float):
        failure.trap(Exception)
        where = f"the {adapter.name} service ({_host(adapter.base_url)})"
        if failure.check(AttemptTimedOut):
            raise Problem(504, "upstream-timeout", "Upstream timed out",
                          f"{where} did not answer completely within {timeout:g} s.")
        if failure.check(defer.CancelledError):
            return failure
        if failure.check(ResponseTooLarge):
            raise Problem(502, "upstream-too-large", "Upstream answer too large",
                          f"{where} answered more than {failure.value.args[0]} bytes, "
                          "the most the ambassador reads from it.")
        if not failure.check(UpstreamFailed):
            return failure
        raise Problem(502, "upstream-unreachable", "Upstream unreachable", f"Calling {where}: {failure.value.reason}.")


# Upstream answers that count as failures for the circuit breaker.
_FAILED_STATUSES = frozenset({500, 502, 503, 504})


def _bypassed(answer: Answer, trace: Trace) -> Answer:
    trace.cache = "bypass"
    return evolve(answer, headers=[*answer.headers, ("Cache-Status", f"{CACHE_NAME}; fwd=bypass")])


def _with_retry_after(response: UpstreamResponse, seconds: float) -> UpstreamResponse:
    return evolve(response, headers={**response.headers, "retry-after": whole_seconds(seconds)})




class Timeouts:
    """Timeouts of the calls in flight, kept with one timer of the clock rather than one per call.

    Nearly every call ends long before its timeout, and a timer per call would be armed, pushed
    into the reactor's heap (ordered by a Python ``__lt__``) and cancelled each time. This one timer
    is armed for the earliest timeout only; when it goes off, it cancels the calls that are due and
    is armed again for the next one.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._due: dict[defer.Deferred, float] = {}  # each call in flight and when it times out
        self._timer = None
        self._timer_due = math.inf

    def start(self, call: defer.Deferred, due: float) -> None:
        """Cancel ``call`` at ``due`` (on the clock) unless it is stopped before."""
        self._due[call] = due
        if due < self._timer_due:
            if self._timer is not None:
                self._timer.cancel()
            self._arm(due)

    def stop(self, call: defer.Deferred) -> bool:
        """Forget ``call``'s timeout: True, or False when the timeout has cancelled it already."""
        return self._due.pop(call, None) is not None

    def _arm(self, due: float) -> None:
        self._timer, self._timer_due = self._clock.callLater(due - self._clock.seconds(), self._expire), due

    def _expire(self) -> None:
        now = max(self._clock.seconds(), self._timer_due)  # the timer may run a rounding error early
        self._timer, self._timer_due = None, math.inf
        expired = [call for call, due in self._due.items() if due <= now]
        for call in expired:
            del self._due[call]
        if self._due:
            self._arm(min(self._due.values()))
        for call in expired:  # after re-arming: a cancelled call may start the next attempt at once
            call.cancel()


class AttemptTimedOut(Exception):
    """One upstream attempt took longer than its timeout."""


def _deadline_problem(adapter: IExternalAdapter, policy: Policy) -> Problem:
    return Problem(
        504,
        "upstream-timeout",
        "Upstream timed out",
        f"The {adapter.name} service ({_host(adapter.base_url)}) did not answer completely within the "
        f"{policy.timeout:g} s deadline (all attempts included).",
    )


def _host(base_url: str) -> str:
    return base_url.split("://", 1)[-1]



