"""The cache stage: GET and HEAD answered from the response cache, misses coalesced into one fetch.

It sits above the exchange chain and works on the adapter's Answers, not on
upstream responses: what the cache stores is the adapter's interpretation
(``ambassador.cache.responses``). With ``--workers``, a miss of a key another
process owns is asked of that process (``ambassador.cache.peers``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from attrs import evolve
from twisted.internet import defer

from ambassador.cache.responses import CACHE_NAME, CallerWish, Entry, ResponseCache, Served, cache_key
from ambassador.exchange import Answer, InboundRequest, Trace, UpstreamRequest
from ambassador.metrics import Metrics
from ambassador.shared.namespace import namespace
from ambassador.pipeline.resilience import Policy


class Caching:
    def __init__(self, cache: ResponseCache | None, metrics: Metrics, peers=None) -> None:
        self._cache = cache
        self._metrics = metrics
        self._peers = peers  # ambassador.cache.peers.Peers with --workers
        self._counted: dict[str, dict] = {}  # label children bound once per adapter

    def answer(self, adapter, policy: Policy, inbound: InboundRequest, request: UpstreamRequest, trace: Trace,
               fetch: Callable[[UpstreamRequest], defer.Deferred], interpret: Callable, *,
               for_peer: bool) -> defer.Deferred:
        """The Answer to ``inbound``, from the cache where policy and caller allow, else by ``fetch`` (of an
        upstream response) and ``interpret``. ``for_peer``: see ``Gateway.answer``."""
        cache = self._cache
        cacheable = request.method in ("GET", "HEAD") and not request.body
        wish = CallerWish.of(inbound.headers) if cache is not None and policy.cache and cacheable else None
        if cache is None or wish is None or wish.bypass:
            if for_peer:  # the asker forwards only what its cache would fetch: the same settings say no here
                return defer.fail(RuntimeError("a request forwarded by another process does not go through the cache"))
            answered = fetch(request).addCallback(interpret)
            return answered if wish is None else answered.addCallback(_bypassed, trace)

        def conditional_fetch(conditional: dict[str, str]) -> defer.Deferred:
            return fetch(request.with_headers({**request.headers, **conditional}) if conditional else request)

        key = cache_key(namespace(adapter), inbound.route.name, request)
        forward = None
        if self._peers is not None and not for_peer and request.method == "GET":  # the owner is sent a GET
            forward = partial(self._peers.ask, adapter, inbound, key, policy.timeout)
        served = cache.serve(key, policy, request.headers, wish, conditional_fetch, interpret, forward)
        if for_peer:
            return served.addCallback(_with_entry, cache, key)
        return served.addCallback(self._served, adapter.name, inbound, trace)

    def _served(self, served: Served, adapter: str, inbound: InboundRequest, trace: Trace) -> Answer:
        trace.cache = served.outcome
        if trace.upstream_status is None:
            trace.upstream_status = served.upstream_status
        counted = self._counted.get(adapter)
        if counted is None:
            counted = self._counted[adapter] = self._metrics.cache_answers_of(adapter)
        counted[served.outcome].inc()
        if served.answer.status == 200 and served.unchanged_for(inbound.headers.get("if-none-match")):
            return Answer(304, served.headers(), b"")  # the caller has this answer already
        return Answer(served.answer.status, served.headers(), served.answer.body)


def _with_entry(served: Served, cache: ResponseCache, key: str) -> tuple[Served, Entry | None]:
    return served, cache.kept_for(key, served)


def _bypassed(answer: Answer, trace: Trace) -> Answer:
    trace.cache = "bypass"
    return evolve(answer, headers=[*answer.headers, ("Cache-Status", f"{CACHE_NAME}; fwd=bypass")])
