"""One upstream fetch per key across ``--workers`` processes: each key has an owner process.

The owner of a cache key is a stable hash of the key modulo the number of
processes (groupcache's model). A process about to fetch a key it does not own
(a miss with no fetch of its own in flight) asks the owner instead: it forwards
the caller's request, as plain HTTP/1.1, over the owner's UNIX socket in a
private directory (mode 0700, made by the primary). The owner answers it
through its own response cache, so every process's asks for one key join one
flight there, and relays what its cache made of it: the answer with the cache
entry it keeps, which the asker then keeps as well (its later hits are its own,
in its own memory). A request that came over the peer socket is never
forwarded again. Cache hits never leave their process.

Not a TCP port: the application container shares the Pod's network namespace,
not the ambassador's filesystem. Nothing secret crosses: the caller's request
headers are filtered as for any adapter, the owner attaches the credential
to its own upstream attempt, and entries never hold one.

When the owner cannot be asked (restarting, its socket gone, too slow, an
answer that cannot be read) the asker fetches from the upstream itself,
logs a warning and counts it (``ambassador_peer_asks_total{outcome="fallback"}``):
correctness over coalescing.
"""

from __future__ import annotations

import json
import os
import zlib

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint, UNIXServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from ambassador.cache.responses import ForwardFailed, Served, entry_meta, entry_of
from ambassador.exchange import Answer, InboundRequest, UpstreamRequest, without_params
from ambassador.metrics import CACHE_OUTCOMES, Metrics
from ambassador.problems import Problem
from ambassador.pipeline.client import DEFAULT_MAX_RESPONSE_BYTES, UpstreamClient
from ambassador.pipeline.gateway import Gateway
from ambassador.web.proxy import ProxyFactory

log = Logger(namespace="ambassador")

#: The content type of an owner's answer to an ask.
RELAY_TYPE = "application/vnd.ambassador.relay"
#: Seconds an ask may take beyond the adapter's timeout: the owner's own 504 arrives then, not a fallback.
ASK_MARGIN = 1.0
_META_ROOM = 64 * 1024  # bytes a relay may hold beyond the answer's body (its metadata line)
_NOT_FORWARDED = frozenset({"expect", "x-request-id"})  # expect: nothing to continue; the id is set below


def owner_of(key: str, count: int) -> int:
    """The index of the process owning ``key`` among ``count``: the same in every process (Python's
    ``hash()`` is salted per process)."""
    return zlib.crc32(key.encode()) % count


def socket_path(directory: str, index: int) -> str:
    return os.path.join(directory, f"worker-{index}.sock")


def _peer_connections(reactor, directory: str) -> UpstreamClient:
    """The client for asks: kept-alive connections to the other processes' peer sockets, origin
    ``http://worker-<i>`` meaning ``<directory>/worker-<i>.sock``."""

    def endpoint(uri) -> UNIXClientEndpoint:
        return UNIXClientEndpoint(reactor, os.path.join(directory, f"{uri.host.decode('ascii')}.sock"), timeout=3)

    return UpstreamClient(reactor, endpoints=endpoint, user_agent="ambassador-peer")


class Peers(Service):
    """This process (``index``) among ``count`` serving together: who owns a key, and asking the owner."""

    def __init__(self, reactor, directory: str, index: int, count: int, metrics: Metrics, clock=None) -> None:
        self.directory = directory
        self.index = index
        self.count = count
        self._clock = clock or reactor
        self._connections = _peer_connections(reactor, directory)
        self._asks = {outcome: metrics.peer_asks.labels(outcome) for outcome in ("relayed", "fallback")}

    def listening_endpoint(self, reactor) -> UNIXServerEndpoint:
        """Where this process answers the others' asks."""
        path = socket_path(self.directory, self.index)
        if os.path.exists(path):
            os.unlink(path)  # left by this worker's predecessor, killed before it could remove it
        return UNIXServerEndpoint(reactor, path, backlog=511, mode=0o600)

    def ask(self, adapter, inbound: InboundRequest, key: str, timeout: float) -> defer.Deferred | None:
        """Ask the owner of ``key`` for ``inbound``'s answer (see ``ambassador.cache.responses.Forward``); None when
        this process owns it."""
        owner = owner_of(key, self.count)
        if owner == self.index:
            return None
        headers = {name: value for name, value in inbound.headers.items() if name not in _NOT_FORWARDED}
        headers["X-Request-ID"] = inbound.request_id
        path = "/".join((inbound.route.path.rstrip("/"), *inbound.segments))
        limit = getattr(adapter, "max_response_bytes", DEFAULT_MAX_RESPONSE_BYTES) + _META_ROOM
        query = without_params(inbound.query, adapter.secret_params)  # the caller's own key stays here too
        call = self._connections.fetch(f"http://worker-{owner}", UpstreamRequest("GET", path, query, headers),
                                       max_body=limit)
        call.addTimeout(timeout + ASK_MARGIN, self._clock)
        return call.addCallbacks(self._answered, self._not_answered, callbackArgs=(owner,),
                                 errbackArgs=(owner, timeout + ASK_MARGIN))

    def _answered(self, response, owner: int) -> tuple:
        if response.status != 200 or response.content_type != RELAY_TYPE:
            raise self._fallback(owner, f"it answered status {response.status}")
        try:
            relayed = decode_relay(response.body)
        except Problem:
            self._asks["relayed"].inc()
            raise
        except (ValueError, TypeError, KeyError, IndexError):
            raise self._fallback(owner, "its answer could not be read")
        self._asks["relayed"].inc()
        return relayed

    def _not_answered(self, failure: Failure, owner: int, timeout: float):
        if failure.check(defer.CancelledError):  # every caller left
            return failure
        if failure.check(defer.TimeoutError):
            raise self._fallback(owner, f"it did not answer within {timeout:g} s")
        raise self._fallback(owner, f"it could not be reached ({failure.type.__name__})")

    def _fallback(self, owner: int, why: str) -> ForwardFailed:
        self._asks["fallback"].inc()
        log.warn("Worker {owner} owns a cache key this process needs, but {why}; fetching it here instead",
                 owner=owner, why=why)
        return ForwardFailed(why)

    def stopService(self):
        super().stopService()
        return self._connections.close()


class PeerFactory(ProxyFactory):
    """The peer socket's listener: requests other processes forwarded, routed like any other and
    answered with a relay of what this process's cache made of them (never forwarded again).
    They are counted and logged by the process that asked: here, in metrics nobody reads, and no
    access-log line (the asker warns when an ask fails)."""

    def __init__(self, adapters, gateway: Gateway, clock, *, limits) -> None:
        super().__init__(adapters, _Relaying(gateway), Metrics(), clock, limits=limits, access_log="none")

    def reroute(self, adapters, gateway: Gateway) -> None:  # type: ignore[override]  # a Gateway, relayed
        super().reroute(adapters, _Relaying(gateway))


class _Relaying:
    """What a PeerFactory's routes call instead of the Gateway: its ``relay``, encoded."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def answer(self, adapter, inbound: InboundRequest, trace) -> defer.Deferred:
        relayed = self._gateway.answer(adapter, inbound, trace, for_peer=True)
        return relayed.addCallbacks(_relay_answer, _problem_relay_answer)


def _relay_answer(relayed: tuple) -> Answer:
    return Answer(200, [("Content-Type", RELAY_TYPE)], encode_relay(*relayed))


def _problem_relay_answer(failure: Failure) -> Answer:
    failure.trap(Problem)  # anything else is this process's failure: a 500, and the asker fetches itself
    return Answer(200, [("Content-Type", RELAY_TYPE)], encode_problem(failure.value))


def encode_relay(served: Served, entry) -> bytes:
    """An owner's answer to an ask: one JSON line (what the cache did, and the entry it keeps for the
    answer, or the answer's status and headers), then the answer's body."""
    meta: dict = {"served": [served.status, served.outcome, served.age, served.upstream_status]}
    if entry is not None:
        meta["entry"] = entry_meta(entry)
    else:
        meta["answer"] = [served.answer.status, served.answer.headers]
    return json.dumps(meta, separators=(",", ":")).encode() + b"\n" + served.answer.body


def encode_problem(problem: Problem) -> bytes:
    """An owner's answer to an ask when its cache answered with a Problem (an upstream failure)."""
    meta = {"problem": [problem.status, problem.kind, problem.title, problem.detail, problem.headers,
                        problem.extensions]}
    return json.dumps(meta, separators=(",", ":")).encode() + b"\n"


def decode_relay(data: bytes) -> tuple[Served, object]:
    """(Served, the Entry to keep or None) from an owner's answer; raises the Problem it relays, or
    ValueError, TypeError, KeyError or IndexError when ``data`` is not a relay."""
    meta_line, newline, body = data.partition(b"\n")
    if not newline:
        raise ValueError("not a relay: no metadata line")
    meta = json.loads(meta_line)
    if "problem" in meta:
        status, kind, title, detail, headers, extensions = meta["problem"]
        raise Problem(int(status), str(kind), str(title), str(detail),
                      headers=[(str(n), str(v)) for n, v in headers], **dict(extensions))
    status, outcome, age, upstream_status = meta["served"]
    if outcome not in CACHE_OUTCOMES:
        raise ValueError(outcome)
    if "entry" in meta:
        entry = entry_of(meta["entry"], body)
        answer = entry.answer
    else:
        entry, (code, headers) = None, meta["answer"]
        answer = Answer(int(code), [(str(n), str(v)) for n, v in headers], body)
    served = Served(answer, str(status), outcome, None if age is None else float(age),
                    None if upstream_status is None else int(upstream_status))
    return served, entry
