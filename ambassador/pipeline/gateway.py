"""The upstream pipeline: the stages every request to an adapter's upstream takes.

Adapters describe requests; the Gateway runs them through the cache stage and
the adapter's chain of exchange stages (``ambassador.pipeline.stages``), and
has the adapter interpret the answer.
"""

from __future__ import annotations

import random

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from ambassador.app.health import Readiness
from ambassador.cache.responses import ResponseCache
from ambassador.exchange import Answer, InboundRequest, Trace, UpstreamRequest, UpstreamResponse
from ambassador.interfaces import IExternalAdapter
from ambassador.metrics import Metrics
from ambassador.pipeline.client import UpstreamClient
from ambassador.pipeline.guard import Guard
from ambassador.pipeline.stages import Call, Stage
from ambassador.pipeline.stages.breaker import Breaker
from ambassador.pipeline.stages.caching import Caching
from ambassador.pipeline.stages.concurrency import Concurrency
from ambassador.pipeline.stages.credential import Credential
from ambassador.pipeline.stages.deadline import Deadline
from ambassador.pipeline.stages.ratelimit import RateLimit
from ambassador.pipeline.stages.retry import Retry
from ambassador.pipeline.stages.send import Send
from ambassador.problems import Problem
from ambassador.tracing import Tracing


class Gateway:
    """Runs one inbound request through an adapter and the upstream pipeline.

    Per adapter it holds the chain of stages its resilience policy (``guards``)
    asks for. It records what it learns about the credential in ``readiness``
    and fills in the request's Trace.
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
        tracing: Tracing | None = None,
    ) -> None:
        self._readiness = readiness
        self._guards = guards
        self._forward_request_id = forward_request_id
        self._caching = Caching(cache, metrics, peers)
        rng = rng or random.Random()
        for name in guards:
            metrics.serve(name)
        self._chains = {name: _chain(guard, client, clock, metrics, name, rng, tracing) for name, guard in guards.items()}
        self._probes = {name: _probe_chain(guard, client, clock, metrics, name) for name, guard in guards.items()}

    def answer(self, adapter: IExternalAdapter, inbound: InboundRequest, trace: Trace, *,
               for_peer: bool = False) -> defer.Deferred:
        """A Deferred firing with the Answer or failing with a Problem. Cancel it to abandon.

        ``for_peer``: ``inbound`` was forwarded by another process (``ambassador.cache.peers``); the Deferred
        fires with (Served, the Entry kept for it or None), and the request is never forwarded again."""
        try:
            request = adapter.upstream_request(inbound)
        except Problem:
            return defer.fail()
        if inbound.request_id and adapter.name in self._forward_request_id:
            request = request.with_headers({**request.headers, "X-Request-ID": inbound.request_id})
        chain = self._chains[adapter.name]

        def fetch(sent: UpstreamRequest) -> defer.Deferred:
            return defer.ensureDeferred(chain(Call(adapter, sent, trace)))

        def interpret(response: UpstreamResponse) -> Answer:
            return self._interpret(response, adapter, inbound)

        return self._caching.answer(adapter, self._guards[adapter.name].policy, inbound, request, trace, fetch,
                                    interpret, for_peer=for_peer)

    def probe(self, adapter: IExternalAdapter, path: str) -> defer.Deferred:
        """Ask the upstream for ``path``; fires with None when it answered well, else why not."""
        call: defer.Deferred = defer.ensureDeferred(
            self._probes[adapter.name](Call(adapter, UpstreamRequest("GET", path), Trace())))
        call.addCallbacks(
            lambda response: None if response.status < 400 else f"{path} answered status {response.status}",
            lambda failure: failure.value.detail if failure.check(Problem) else failure.getErrorMessage(),
        )
        return call

    def _interpret(self, response: UpstreamResponse, adapter: IExternalAdapter, inbound: InboundRequest) -> Answer:
        state = self._readiness[adapter.name]
        try:
            answer = adapter.interpret(inbound, response)
        except Problem as problem:
            if problem.kind == "credential-rejected":
                state.credential_refused(response.status)
            raise
        if answer.status < 500:
            state.credential_accepted()
        return answer


def _chain(guard: Guard, client: UpstreamClient, clock: IReactorTime, metrics: Metrics, name: str,
           rng: random.Random, tracing: Tracing | None) -> Stage:
    """The adapter's stages, innermost first; those its policy turns off are left out."""
    policy = guard.policy
    stage: Stage = Send(client, policy, clock, metrics.upstream(name), tracing)
    stage = Concurrency(stage, guard.slots, policy, clock, metrics.concurrency_rejections.labels(name))
    if guard.bucket is not None:
        stage = RateLimit(stage, guard.bucket, policy, clock, metrics.rate_limit_waits.labels(name),
                          metrics.rate_limit_rejections.labels(name))
    stage = Credential(stage)
    if guard.breaker is not None:
        stage = Breaker(stage, guard.breaker)
    stage = Retry(stage, policy, clock, rng, metrics.retries.labels(name))
    return Deadline(stage, policy.timeout, clock)


def _probe_chain(guard: Guard, client: UpstreamClient, clock: IReactorTime, metrics: Metrics, name: str) -> Stage:
    """A readiness probe asks once, with the credential, within the deadline: no breaker, limit or retry."""
    return Deadline(Credential(Send(client, guard.policy, clock, metrics.upstream(name))), guard.policy.timeout, clock)
