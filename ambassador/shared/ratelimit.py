"""One rate limit, and one back-off, for every replica: each adapter's token bucket kept in Redis.

The bucket is the same GCRA as the local ``TokenBucket`` (a theoretical
arrival time, TAT), kept under the adapter's key and advanced by one Lua
script, so taking a token is one atomic operation whatever the number of
replicas, on Redis' clock (``TIME``), not theirs. A request the bucket
would keep waiting longer than the queue allows is refused at once, as
locally. An upstream's ``Retry-After`` moves the TAT past the time it gave:
every replica then holds back.

While Redis cannot be asked, each process falls back to its local bucket,
which holds the limit over ``--replicas-hint`` (and ``--workers``): the
Deployment keeps roughly to the limit if the hint is right. The shared
limit resumes by itself when Redis is back.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from prometheus_client import Gauge
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from ambassador.cache.redisstore import StoreUnavailable
from ambassador.interfaces import IExternalAdapter
from ambassador.pipeline.resilience import Policy
from ambassador.pipeline.stages.ratelimit import RateLimited, TokenBucket
from ambassador.shared.namespace import namespace

log = Logger(namespace="ambassador")

PREFIX = "ambassador:ratelimit:v1:"
#: A TAT further ahead than this is not one we wrote (no Retry-After is honoured for a day): ignored.
_FURTHEST_US = 86_400 * 1_000_000

# KEYS[1] the adapter's bucket. ARGV: microseconds per request, burst, the longest a request may queue
# (µs). Returns {1, µs to wait} with the token taken, or {0, µs it would have waited}.
ACQUIRE = b"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval, burst, max_wait = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now or tat > now + %d then tat = now end
local wait = tat - (burst - 1) * interval - now
if wait > max_wait then return {0, math.floor(wait)} end
tat = tat + interval
redis.call('SET', KEYS[1], string.format('%%d', tat), 'PX', math.floor((tat - now) / 1000) + 1000)
return {1, math.floor(math.max(wait, 0))}
""" % _FURTHEST_US

# KEYS[1] the adapter's bucket. ARGV: microseconds per request, burst, µs to send nothing for.
HOLD = b"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval, burst, hold = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local held = now + hold + (burst - 1) * interval
local tat = tonumber(redis.call('GET', KEYS[1])) or 0
if held > tat then
  redis.call('SET', KEYS[1], string.format('%d', held), 'PX', math.floor((held - now) / 1000) + 1000)
end
return 1
"""


class SharedBucket:
    """``TokenBucket``'s ``acquire``/``hold_for`` for the Deployment: ``adapter``'s bucket at ``policy``'s
    rate in ``redis`` (a RedisStore), ``local`` while Redis cannot be asked."""

    def __init__(self, redis, adapter: IExternalAdapter, clock: IReactorTime, policy: Policy,
                 local: TokenBucket) -> None:
        assert policy.rate_limit is not None
        self._redis, self._adapter, self._clock, self._local = redis, adapter, clock, local
        self._interval_us = max(1, round(1_000_000 / policy.rate_limit))
        self._burst = policy.burst
        self._max_wait_us = math.floor(policy.rate_queue * 1_000_000)
        self._warned = False  # about a reply that is not the script's

    def _key(self) -> str:
        return PREFIX + namespace(self._adapter)

    def acquire(self) -> defer.Deferred:
        """Fires (with the seconds waited) when the request may be sent; fails with RateLimited."""
        if not self._redis.available:
            return self._local.acquire()
        asked = self._redis.script(ACQUIRE, [self._key().encode()], [self._interval_us, self._burst,
                                                                     self._max_wait_us])
        return asked.addCallbacks(self._granted, self._unavailable)

    def hold_for(self, seconds: float) -> None:
        """Nobody sends for ``seconds`` (the upstream asked): this process at once, every replica through Redis."""
        self._local.hold_for(seconds)
        if self._redis.available:
            self._redis.script(HOLD, [self._key().encode()], [self._interval_us, self._burst,
                                                              math.ceil(seconds * 1_000_000)]).addErrback(_ignored)

    def _granted(self, reply: object) -> defer.Deferred | float:
        if not (isinstance(reply, list) and len(reply) == 2 and all(type(n) is int for n in reply)):
            if not self._warned:
                self._warned = True
                log.warn("Redis answered the rate-limit script with something else; such requests are "
                         "limited locally")
            return self._local.acquire()
        allowed, wait = reply[0] == 1, reply[1] / 1_000_000
        if not allowed:
            raise RateLimited(wait)
        if wait <= 0:
            return 0.0
        return deferLater(self._clock, wait, lambda: wait)

    def _unavailable(self, failure: Failure) -> defer.Deferred:
        failure.trap(StoreUnavailable)  # the store logs why, once per change
        return self._local.acquire()


def _ignored(failure: Failure) -> None:
    failure.trap(StoreUnavailable)  # this process holds back all the same


class SharedLimits:
    """The shared buckets of one process, and what it says when Redis goes and comes back."""

    def __init__(self, adapters: list[str], replicas_hint: int, mode_gauges: Callable[[str, str], Gauge]) -> None:
        self._adapters = adapters
        self._replicas_hint = replicas_hint
        self._gauges = mode_gauges
        self.shared = False
        self._set(False)

    def changed(self, available: bool) -> None:
        """The RedisStore's ``on_change``: the limits are shared while it is available."""
        if available == self.shared:
            return
        self._set(available)
        names = ", ".join(self._adapters)
        if available:
            log.info("Rate limits of {adapters} are shared through Redis by every replica", adapters=names)
        else:
            log.warn("Rate limits of {adapters} are enforced by each replica alone while Redis is away, "
                     "each at the limit over --replicas-hint {replicas}", adapters=names,
                     replicas=self._replicas_hint)

    def _set(self, shared: bool) -> None:
        self.shared = shared
        for adapter in self._adapters:
            self._gauges(adapter, "shared").set(1 if shared else 0)
            self._gauges(adapter, "local").set(0 if shared else 1)
