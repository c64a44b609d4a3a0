"""One upstream fetch per cache key for the Deployment: a lease in Redis says which replica fetches.

A replica about to fetch a key for the shared cache (a miss, a revalidation,
a stale-while-revalidate refresh) first claims the key's lease: ``SET NX PX``
with a random token. The holder fetches, stores the entry and releases the
lease (deleted only while it still holds the token). The others look for the
entry in Redis, 25 ms after claiming failed and then at doubling intervals up
to 250 ms, and serve it once it is there; each look also tries the lease
again, so a holder that died or hung frees the key when its lease expires
and one that got an answer it could not store frees it when done, and the
next replica fetches. No wait outlasts the adapter's timeout: past it, the
replica fetches itself; with Redis unreachable it fetches at once.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from ambassador.cache.redisstore import StoreUnavailable
from ambassador.cache.responses import ForwardFailed, Served, hit
from ambassador.shared.namespace import redis_key

PREFIX = "ambassador:lease:v1:"
FIRST_LOOK = 0.025
LONGEST_LOOK = 0.25

# KEYS[1] the lease; ARGV: this claim's token, the lease's length in ms. 1 when claimed.
CLAIM = b"""
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""
# KEYS[1] the lease; ARGV[1] the token it was claimed with. Deleted only while it is still that claim's.
RELEASE = b"""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Leases:
    """The leases of one process's shared cache (``store``, a SharedStore over ``redis``)."""

    def __init__(self, redis, store, clock: IReactorTime) -> None:
        self._redis, self._store, self._clock = redis, store, clock
        self._held: dict[str, bytes] = {}  # cache key → token of the lease this process holds on it

    def wait(self, key: str, timeout: float, request_headers: Mapping[str, str]) -> defer.Deferred:
        """The ``Forward`` of ResponseCache: fires with (Served, None) when another replica stored the
        entry meanwhile, fails with ForwardFailed when this process is to fetch (it holds the lease,
        or waited ``timeout``, or Redis cannot be asked)."""
        return defer.ensureDeferred(self._wait(key, timeout, request_headers))

    async def _wait(self, key: str, timeout: float, request_headers: Mapping[str, str]) -> tuple[Served, None]:
        deadline = self._clock.seconds() + timeout
        token = secrets.token_hex(16).encode()
        look, waited = FIRST_LOOK, False
        try:
            while True:
                claimed = await self._redis.script(CLAIM, [redis_key(PREFIX, key)], [token, math.ceil(timeout * 1000)])
                if claimed == 1:
                    self._held[key] = token
                    # A holder stores its entry before it releases: one freed after our last look has it.
                    served = await self._stored(key, request_headers) if waited else None
                    if served is None:
                        raise ForwardFailed("this replica holds the lease")
                    self.release(None, key)
                    return served, None
                if self._clock.seconds() + look > deadline:
                    raise ForwardFailed("waited the adapter's timeout for another replica")
                await deferLater(self._clock, look)
                look, waited = min(look * 2, LONGEST_LOOK), True
                served = await self._stored(key, request_headers)
                if served is not None:
                    return served, None
        except StoreUnavailable:
            raise ForwardFailed("Redis cannot be asked") from None

    async def _stored(self, key: str, request_headers: Mapping[str, str]) -> Served | None:
        """What another replica stored for ``key`` meanwhile, if it is fresh and fits the request."""
        now = self._clock.seconds()
        entry = await self._store.get(key, now)
        if entry is not None and entry.ttl(now) > 0 and entry.matches(request_headers):
            return hit(entry, now).collapsed()
        return None

    def release(self, result: object, key: str) -> object:
        """Once the fetch of ``key`` has landed (its entry stored): let the others go on."""
        token = self._held.pop(key, None)
        if token is not None:
            self._redis.script(RELEASE, [redis_key(PREFIX, key)], [token]).addErrback(
                lambda failure: failure.trap(StoreUnavailable))  # it expires on its own
        return result
