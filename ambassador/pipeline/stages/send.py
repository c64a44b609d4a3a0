"""The innermost stage: one call to the upstream within what is left of the deadline, counted, and its
failures said as Problems."""

from __future__ import annotations

from attrs import define
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from ambassador.exchange import UpstreamResponse
from ambassador.metrics import UpstreamMetrics
from ambassador.problems import Problem
from ambassador.pipeline.answers import bad_answer
from ambassador.pipeline.client import (
    DEFAULT_MAX_RESPONSE_BYTES,
    ProxyFailed,
    ResponseTooLarge,
    UnreadableAnswer,
    UpstreamClient,
    UpstreamFailed,
)
from ambassador.pipeline.egress import egress_of
from ambassador.pipeline.resilience import Policy
from ambassador.pipeline.stages import Call
from ambassador.pipeline.stages.deadline import deadline_passed
from ambassador.tracing import Tracing


class AttemptTimedOut(Exception):
    """One upstream attempt took longer than its timeout."""


@define
class Send:
    client: UpstreamClient
    policy: Policy
    clock: IReactorTime
    metrics: UpstreamMetrics  # the adapter's
    tracing: Tracing | None = None  # on: a CLIENT span per attempt, under the inbound request's

    async def __call__(self, call: Call) -> UpstreamResponse:
        adapter, clock, request = call.adapter, self.clock, call.request
        remaining = call.deadline - clock.seconds()
        if remaining <= 0:  # the waits before this attempt used the deadline up
            raise deadline_passed(adapter, self.policy.timeout)
        timeout = min(remaining, self.policy.attempt_timeout or remaining)
        call.trace.attempts += 1
        tracing, span = self.tracing, None
        if tracing is not None and call.trace.span is not None:  # not a probe's attempt
            span = tracing.client_span(call.trace.span, request.method, adapter.base_url, request.path,
                                       call.trace.attempts - 1)
            if getattr(adapter, "propagate_trace", False):  # the adapter's choice: an outside service sees it
                request = request.with_headers({**request.headers, **tracing.traceparent(span)})
        started = clock.seconds()
        limit = getattr(adapter, "max_response_bytes", DEFAULT_MAX_RESPONSE_BYTES)
        encoding = getattr(adapter, "accept_encoding", "identity")
        try:
            fetched = self.client.fetch(adapter.base_url, request, max_body=limit, accept_encoding=encoding,
                                        egress=egress_of(adapter))
        except Exception:  # a request the client refuses at once (a bad header) fails like any other attempt
            fetched = defer.fail()
        # The timeout cancels the call, which drops its connection.
        fetched.addTimeout(timeout, clock, onTimeoutCancel=lambda result, timeout: Failure(AttemptTimedOut()))
        try:
            response = await fetched
        except Exception as e:
            outcome = _outcome_of(e)
            self.metrics.attempted(outcome, clock.seconds() - started)
            explained = e if isinstance(e, defer.CancelledError) else _explained(e, adapter, timeout)
            if span is not None and tracing is not None:
                tracing.attempt_ended(span, None, explained.kind if isinstance(explained, Problem) else outcome)
            if explained is e:  # the caller left (or a failure the client's contract does not name)
                raise
            raise explained from None
        call.trace.upstream_status = response.status
        self.metrics.attempted(f"{response.status // 100}xx", clock.seconds() - started)
        if span is not None and tracing is not None:
            tracing.attempt_ended(span, response.status)
        return response


def _outcome_of(e: Exception) -> str:
    """The ``outcome`` label of a failed attempt."""
    if isinstance(e, AttemptTimedOut):
        return "timeout"
    if isinstance(e, defer.CancelledError):
        return "cancelled"
    if isinstance(e, ProxyFailed):
        return "proxy-timeout" if e.timed_out else "proxy-failed"
    if isinstance(e, UnreadableAnswer):
        return "undecodable"
    return "too-large" if isinstance(e, ResponseTooLarge) else "unreachable"


def _explained(e: Exception, adapter, timeout: float) -> Exception:
    """The Problem a failed attempt is for the caller; anything the client's contract does not name as is."""
    # The caller is told which service, never where it is: the upstream's address is the operator's business.
    where = f"the {adapter.name} service"
    if isinstance(e, AttemptTimedOut):
        return Problem(504, "upstream-timeout", "Upstream timed out",
                       f"{where} did not answer completely within {timeout:g} s.")
    if isinstance(e, ResponseTooLarge):
        return Problem(502, "upstream-too-large", "Upstream answer too large",
                       f"{where} answered more than {e.args[0]} bytes, the most the ambassador reads from it.")
    if isinstance(e, UnreadableAnswer):
        return bad_answer(adapter.name, e.reason)
    if isinstance(e, UpstreamFailed):
        return Problem(502, "upstream-unreachable", "Upstream unreachable", f"Calling {where}: {e.reason}.")
    if isinstance(e, ProxyFailed):  # the reason names the proxy; the upstream stays unnamed (the proxy's to reach)
        if e.timed_out:
            return Problem(504, "proxy-timeout", "Forward proxy timed out", f"Calling {where}: {e.reason}.")
        return Problem(502, "proxy-failed", "Forward proxy failed", f"Calling {where}: {e.reason}.")
    return e
