"""The response cache: fresh answers without an upstream call, one upstream call for many
callers, and stale answers while the outside service fails.

Freshness follows RFC 9111 as a shared cache (``s-maxage``, ``max-age``, ``Expires``;
``no-store`` and ``private`` are never stored), staleness RFC 5861
(``stale-while-revalidate``, ``stale-if-error``), and every answer says what
the cache did in a ``Cache-Status`` header (RFC 9211).

What is stored is the adapter's interpreted Answer, keyed by adapter, route,
method, upstream path and query (parameters sorted): never the credential,
which is attached to each upstream attempt after the key is made.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from urllib.parse import urlencode

from attrs import evolve, frozen
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ambassador.exchange import Answer, UpstreamRequest, UpstreamResponse
from ambassador.problems import Problem
from ambassador.cache.redisstore import ErrorReply, StoreUnavailable
from ambassador.pipeline.resilience import http_date
from ambassador.shared.namespace import redis_key

log = Logger(namespace="ambassador")

CACHE_NAME = "ambassador"
#: Statuses stored when the upstream says how long they stay fresh (RFC 9110's heuristically
#: cacheable statuses, less 206, 308, 405, 414 and 501, which a read API does not answer usefully).
CACHEABLE_STATUSES = frozenset({200, 203, 204, 300, 301, 404, 410})
#: Answers that let a stale entry be served instead, within its stale-if-error window (RFC 5861's
#: 500, 502, 503, 504, and 429: a rate-limited upstream is as unavailable as a failing one).
STALE_IF_ERROR_STATUSES = frozenset({429, 500, 502, 503, 504})
#: How long an entry that can be revalidated is kept after it goes stale: a 304 is cheaper than a body.
REVALIDATION_KEEP = 3600.0
DEFAULT_CACHE_BYTES = 64 * 1024 * 1024
#: The largest single entry, as a fraction of the whole cache.
ENTRY_SHARE = 8
_ENTRY_OVERHEAD = 256  # bytes of bookkeeping per entry, beyond its body and headers


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmg]i?)?b?\Z", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "k": 1000, "ki": 1024, "m": 1000**2, "mi": 1024**2, "g": 1000**3, "gi": 1024**3}


def parse_size(text: str) -> int:
    """Bytes from ``64MiB``, ``512kB``, ``1000000``; ValueError for anything else or less than 1 KiB."""
    match = _SIZE.match(text.strip())
    if match is None:
        raise ValueError(text)
    unit = match.group(2).lower() if match.group(2) else None
    size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size < 1024:
        raise ValueError(text)
    return size


def cache_key(namespace: str, route: str, request: UpstreamRequest) -> str:
    """The key of ``request`` under its adapter's ``namespace`` (ambassador.shared.namespace): parameter
    order is irrelevant, repeated parameters keep their order."""
    query = urlencode(sorted(request.query, key=lambda pair: pair[0]))
    return f"{namespace}\n{route}\n{request.method}\n{request.path}\n{query}"


def directives(value: str | None) -> dict[str, str | None]:
    """A Cache-Control value as {directive (lower case): argument or None}."""
    found: dict[str, str | None] = {}
    if not value:
        return found
    for part in value.split(","):
        name, _, argument = part.partition("=")
        name = name.strip().lower()
        if name:
            found.setdefault(name, argument.strip().strip('"') if argument else None)
    return found


def _seconds(argument: str | None) -> float | None:
    if argument is None:
        return None
    try:
        value = int(argument)  # delta-seconds are whole numbers
    except (TypeError, ValueError):
        return None
    return float(max(value, 0))


@frozen
class CallerWish:
    """What the caller's own Cache-Control asks of the cache."""

    bypass: bool = False  # no-store: neither use nor fill the cache
    revalidate: bool = False  # no-cache, max-age=0: do not answer from the cache without asking upstream

    @classmethod
    def of(cls, headers: Mapping[str, str]) -> CallerWish:
        wish = directives(headers.get("cache-control"))
        if not wish:  # most callers: nothing asked, unless HTTP/1.0's Pragma asks to revalidate
            return _REVALIDATE if "no-cache" in headers.get("pragma", "").lower() else _NOTHING_ASKED
        return cls(bypass="no-store" in wish,
                   revalidate="no-cache" in wish or _seconds(wish.get("max-age", "1")) == 0)


_NOTHING_ASKED, _REVALIDATE = CallerWish(), CallerWish(revalidate=True)


@frozen
class Entry:
    """One stored answer and what is known about its freshness."""

    answer: Answer
    stored_at: float  # clock time the upstream answered
    initial_age: float  # its age then (the upstream's Age header)
    lifetime: float  # seconds it is fresh for, counted from age 0
    while_revalidate: float  # seconds past lifetime it may be served while it is revalidated
    if_error: float  # seconds past lifetime it may be served while the upstream fails
    etag: str | None = None
    last_modified: str | None = None
    vary: tuple[tuple[str, str], ...] = ()  # the request headers the answer varies on, and their values

    def age(self, now: float) -> float:
        return self.initial_age + max(0.0, now - self.stored_at)

    def ttl(self, now: float) -> float:
        """Seconds of freshness left; negative once stale."""
        return self.lifetime - self.age(now)

    def retention(self) -> float:
        """Seconds after it was stored that the entry can still be of use."""
        keep = max(self.while_revalidate, self.if_error, REVALIDATION_KEEP if self.validators() else 0.0)
        return max(0.0, self.lifetime - self.initial_age + keep)

    def validators(self) -> dict[str, str]:
        """Headers that ask the upstream whether this answer is still current."""
        found = {}
        if self.etag:
            found["If-None-Match"] = self.etag
        if self.last_modified:
            found["If-Modified-Since"] = self.last_modified
        return found

    def matches(self, request_headers: Mapping[str, str]) -> bool:
        if not self.vary:
            return True
        lowered = _lowered(request_headers)
        return all(lowered.get(name, "") == value for name, value in self.vary)

    @property
    def size(self) -> int:
        headers = sum(len(name) + len(value) for name, value in self.answer.headers)
        return len(self.answer.body) + headers + _ENTRY_OVERHEAD


def _vary(response: UpstreamResponse, request_headers: Mapping[str, str]) -> tuple | None:
    """The varied-on request headers and values, or None when the answer varies on everything."""
    names = [n.strip().lower() for n in response.headers.get("vary", "").split(",") if n.strip()]
    if "*" in names:
        return None
    lowered = _lowered(request_headers)
    return tuple((name, lowered.get(name, "")) for name in names)


def _lowered(headers: Mapping[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def entry_for(response: UpstreamResponse, answer: Answer, request_headers: Mapping[str, str], policy,
              now: float) -> Entry | None:
    """What to store for ``answer`` (interpreted from ``response``), or None when it must not be stored.

    ``policy`` gives the per-adapter cache settings: ``cache_ttl`` overrides the
    upstream's freshness, ``cache_default_ttl`` applies when the upstream gives
    none, and the ``stale_*`` windows are floors under the upstream's own.
    """
    headers = response.headers
    if response.status not in CACHEABLE_STATUSES or answer.status not in CACHEABLE_STATUSES:
        return None
    control = directives(headers.get("cache-control"))
    if "no-store" in control or "private" in control:
        return None
    if any(name.lower() == "set-cookie" for name, _ in answer.headers):
        return None  # one caller's cookie must not reach the next (adapters drop it unless they opt in)
    vary = _vary(response, request_headers)
    if vary is None:
        return None
    etag, last_modified = headers.get("etag"), headers.get("last-modified")
    lifetime = _lifetime(control, headers, now)
    if policy.cache_ttl is not None:
        lifetime = policy.cache_ttl
    elif "no-cache" in control:
        lifetime = 0.0  # stored, but revalidated before each use
    elif lifetime is None:
        lifetime = policy.cache_default_ttl
    if lifetime <= 0 and not (etag or last_modified):
        return None
    if {"must-revalidate", "proxy-revalidate", "no-cache"} & control.keys():
        while_revalidate = if_error = 0.0  # the upstream forbids serving it stale
    else:
        while_revalidate = max(_seconds(control.get("stale-while-revalidate")) or 0.0, policy.stale_while_revalidate)
        if_error = max(_seconds(control.get("stale-if-error")) or 0.0, policy.stale_if_error)
    return Entry(answer, now, _seconds(headers.get("age")) or 0.0, lifetime, while_revalidate, if_error,
                 etag, last_modified, vary)


def _lifetime(control: dict, headers: Mapping[str, str], now: float) -> float | None:
    for name in ("s-maxage", "max-age"):  # s-maxage is for shared caches like this one
        if name in control:
            return _seconds(control[name]) or 0.0
    if "expires" in headers:
        expires = http_date(headers["expires"])
        if expires is None:
            return 0.0  # an invalid Expires means already expired (RFC 9111 section 5.3)
        date = http_date(headers.get("date")) or now
        return max(0.0, expires - date)
    return None


# What a 304 may update in the stored answer (RFC 9111 section 4.3.4, for the headers adapters pass on).
_REFRESHED_HEADERS = frozenset({"cache-control", "expires", "etag", "last-modified"})


def revalidated(entry: Entry, response: UpstreamResponse, request_headers, policy, now: float) -> Entry:
    """``entry`` refreshed by a 304: the stored answer with the freshness the 304 carries."""
    headers = [(name, response.headers.get(name.lower(), value) if name.lower() in _REFRESHED_HEADERS else value)
               for name, value in entry.answer.headers]
    answer = evolve(entry.answer, headers=headers)
    basis = UpstreamResponse(answer.status, {**{n.lower(): v for n, v in headers}, **response.headers}, answer.body)
    fresh = entry_for(basis, answer, request_headers, policy, now)
    return fresh or evolve(entry, answer=answer, stored_at=now, initial_age=0.0)


@frozen
class Served:
    """An answer and what the cache did to produce it."""

    answer: Answer
    status: str  # the Cache-Status parameters after the cache's name
    outcome: str  # one word for the access log and metrics
    age: float | None = None  # set when the answer came from the cache
    upstream_status: int | None = None

    def collapsed(self) -> Served:
        if self.outcome == "collapsed":  # relayed by another process, collapsed there already
            return self
        return evolve(self, status=self.status + "; collapsed", outcome="collapsed")

    def unchanged_for(self, if_none_match: str | None) -> bool:
        """Whether a caller's ``If-None-Match`` names this answer's ETag (weak comparison, RFC 9110 13.1.2)."""
        if not if_none_match:
            return False
        etag = next((value for name, value in self.answer.headers if name.lower() == "etag"), None)
        if etag is None:
            return False
        offered = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
        return "*" in offered or etag.removeprefix("W/") in offered

    def headers(self) -> list[tuple[str, str]]:
        extra = [("Cache-Status", f"{CACHE_NAME}; {self.status}")]
        if self.age is not None:
            extra.append(("Age", str(int(self.age))))
        return [*self.answer.headers, *extra]


def hit(entry: Entry, now: float, detail: str = "") -> Served:
    ttl = int(entry.ttl(now))
    return Served(entry.answer, f"hit; ttl={ttl}" + (f"; detail={detail}" if detail else ""),
                  detail or "hit", entry.age(now))


class MemoryStore:
    """Entries in this process, least recently used evicted first, within ``max_bytes`` in all."""

    shared = False  # each process has its own

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_bytes // ENTRY_SHARE
        self.bytes = 0
        self.evictions = 0
        self._entries: OrderedDict[str, tuple[Entry, float]] = OrderedDict()  # key → entry, useful until

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, now: float) -> defer.Deferred:
        """A Deferred firing (at once) with the entry, or None; the same as a shared store's."""
        return defer.succeed(self.find(key, now))

    def find(self, key: str, now: float) -> Entry | None:
        found = self._entries.get(key)
        if found is None:
            return None
        if found[1] < now:
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return found[0]

    def put(self, key: str, entry: Entry, now: float) -> bool:
        size = entry.size
        self._remove(key)
        if size > self.max_entry_bytes:
            return False
        while self.bytes + size > self.max_bytes:
            self._remove(next(iter(self._entries)))
            self.evictions += 1
        self._entries[key] = (entry, entry.stored_at + entry.retention())
        self.bytes += size
        return True

    def _remove(self, key: str) -> None:
        found = self._entries.pop(key, None)
        if found is not None:
            self.bytes -= found[0].size


class _Flight:
    """One upstream fetch in progress for a key, and the callers waiting for it."""

    def __init__(self, background: bool) -> None:
        self.call: defer.Deferred | None = None
        self.waiters: list[tuple[defer.Deferred, bool]] = []  # (waiter, joined a fetch already in flight)
        self.background = background


Fetch = Callable[[dict[str, str]], defer.Deferred]  # extra request headers → UpstreamResponse, or a Problem
Interpret = Callable[[UpstreamResponse], Answer]  # may raise a Problem
# Asks the process that owns the key instead of fetching: None when this process owns it, else a Deferred
# firing with (Served, the Entry to store or None), failing with a Problem (the owner's answer) or with
# ForwardFailed (nobody answered: fetch instead).
Forward = Callable[[], "defer.Deferred | None"]


class ForwardFailed(Exception):
    """The process owning a key could not be asked (or its answer not read); the asker fetches itself."""


class ResponseCache:
    """Answers from ``store`` when it can, fetches (once per key at a time) when it must."""

    def __init__(self, store, clock: IReactorTime, leases=None) -> None:
        self.store = store
        self._clock = clock
        self._leases = leases  # with a shared store: one fetch per key for the Deployment (ambassador.shared.leases)
        self._flights: dict[str, _Flight] = {}

    def serve(self, key: str, policy, request_headers: Mapping[str, str], wish: CallerWish,
              fetch: Fetch, interpret: Interpret, forward: Forward | None = None) -> defer.Deferred:
        """A Deferred firing with a Served (at once for a fresh hit in memory) or failing with a Problem.
        With ``forward``, an upstream fetch is first offered to the process owning ``key``."""
        found = self.store.get(key, self._clock.seconds())
        return found.addCallback(self._decide, key, policy, request_headers, wish, fetch, interpret, forward)

    def kept_for(self, key: str, served: Served) -> Entry | None:
        """The entry this process keeps for ``key`` if ``served`` was answered from it (None with a shared
        store: the other processes read it there)."""
        if self.store.shared:
            return None
        entry = self.store.find(key, self._clock.seconds())
        return entry if entry is not None and entry.answer is served.answer else None

    def _decide(self, entry: Entry | None, key, policy, request_headers, wish: CallerWish, fetch: Fetch,
                interpret: Interpret, forward: Forward | None) -> Served | defer.Deferred:
        now = self._clock.seconds()
        if entry is not None and not entry.matches(request_headers):
            entry, reason = None, "vary-miss"
        else:
            reason = "request" if wish.revalidate else ("stale" if entry is not None else "miss")
        if entry is not None and not wish.revalidate:
            ttl = entry.ttl(now)
            if ttl > 0:
                return hit(entry, now)
            if -ttl <= entry.while_revalidate:
                if key not in self._flights:
                    flight = self._flights[key] = _Flight(background=True)
                    self._launch(flight, key, entry, "stale", policy, request_headers, fetch, interpret, forward)
                return hit(entry, now, "stale-while-revalidate")
        pending = self._flights.get(key)
        if pending is not None:
            return self._wait(pending)
        flight = self._flights[key] = _Flight(background=False)
        waiter = self._wait(flight)  # before launching: the fetch may fail at once
        self._launch(flight, key, entry, reason, policy, request_headers, fetch, interpret, forward)
        return waiter

    def _launch(self, flight: _Flight, key, entry, reason, policy, request_headers, fetch, interpret,
                forward: Forward | None) -> None:
        asked = forward() if forward is not None else None
        if asked is None and self._leases is not None:
            asked = self._leases.wait(key, policy.timeout, request_headers)
        if asked is None:
            flight.call = self._fetch(key, entry, reason, policy, request_headers, fetch, interpret)
        else:
            flight.call = asked.addCallbacks(
                self._relayed, self._not_relayed, callbackArgs=(key,),
                errbackArgs=(key, entry, reason, policy, request_headers, fetch, interpret))
        flight.call.addBoth(self._landed, key, flight)
        if self._leases is not None:  # after the entry was stored
            flight.call.addBoth(self._leases.release, key)

    def _fetch(self, key, entry, reason, policy, request_headers, fetch, interpret) -> defer.Deferred:
        conditional = entry.validators() if entry is not None else {}
        fwd = f"fwd={reason}"
        return defer.maybeDeferred(fetch, conditional).addCallbacks(
            self._fetched, self._not_fetched,
            callbackArgs=(key, entry, fwd, conditional, policy, request_headers, interpret),
            errbackArgs=(entry, fwd))

    def _relayed(self, relayed: tuple, key: str) -> Served:
        """The owner's answer: its entry kept here too, so that the next hits are this process's own."""
        served, entry = relayed
        if entry is not None and not self.store.shared:  # a shared store has it already
            self.store.put(key, entry, self._clock.seconds())
        return served

    def _not_relayed(self, failure: Failure, key, entry, reason, policy, request_headers, fetch, interpret):
        if failure.check(ForwardFailed):  # correctness over coalescing: fetch it here
            return self._fetch(key, entry, reason, policy, request_headers, fetch, interpret)
        return self._not_fetched(failure, entry, f"fwd={reason}")  # the owner's Problem, or a cancellation

    def _wait(self, flight: _Flight) -> defer.Deferred:
        waiter: defer.Deferred = defer.Deferred(lambda d: self._left(flight, d))
        flight.waiters.append((waiter, bool(flight.waiters) or flight.background))
        return waiter

    def _left(self, flight: _Flight, waiter: defer.Deferred) -> None:
        flight.waiters = [(w, c) for w, c in flight.waiters if w is not waiter]
        if not flight.waiters and not flight.background and flight.call is not None:
            flight.call.cancel()  # nobody wants the answer any more

    def _landed(self, result, key: str, flight: _Flight) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        for waiter, collapsed in flight.waiters:
            if not isinstance(result, Served):
                waiter.errback(result)
            else:
                waiter.callback(result.collapsed() if collapsed else result)
        if flight.background and isinstance(result, Failure) and not flight.waiters:
            log.warn("Background revalidation failed: {error}", error=result.getErrorMessage())

    def _fetched(self, response: UpstreamResponse, key, entry: Entry | None, fwd: str, conditional: dict,
                 policy, request_headers, interpret: Interpret) -> Served:
        """What the upstream's ``response`` to a fetch makes of the cache and of the answer."""
        upstream, now = response.status, self._clock.seconds()
        try:
            if upstream == 304 and conditional and entry is not None:  # conditional comes from entry
                refreshed = revalidated(entry, response, request_headers, policy, now)
                self.store.put(key, refreshed, now)
                return Served(refreshed.answer, f"{fwd}; fwd-status=304", "revalidated", refreshed.age(now), 304)
            answer = interpret(response)
        except Problem as problem:
            return self._stale_if_error(problem, entry, fwd, upstream)
        stored = entry_for(response, answer, request_headers, policy, now)
        kept = stored is not None and self.store.put(key, stored, now)
        return Served(answer, f"{fwd}; fwd-status={upstream}" + ("; stored" if kept else ""),
                      "miss" if entry is None else "refreshed", None, upstream)

    def _not_fetched(self, failure: Failure, entry: Entry | None, fwd: str) -> Served | Failure:
        if not failure.check(Problem):
            return failure
        return self._stale_if_error(failure.value, entry, fwd, None)

    def _stale_if_error(self, problem: Problem, entry: Entry | None, fwd: str, upstream: int | None) -> Served:
        """The stale entry when ``problem`` (of the upstream, or the ambassador refusing itself) allows it."""
        now = self._clock.seconds()
        if entry is None or problem.status not in STALE_IF_ERROR_STATUSES or -entry.ttl(now) > entry.if_error:
            raise problem
        status = fwd + (f"; fwd-status={upstream}" if upstream else "")
        return Served(entry.answer, f"{status}; ttl={int(entry.ttl(now))}; detail=stale-if-error",
                      "stale-if-error", entry.age(now), upstream)


class SharedStore:
    """Entries in Redis (``ambassador.cache.redisstore.RedisStore``), shared by every replica.

    A Redis that cannot be asked is a miss on lookup and a skipped write: the
    store logs its own reachability, the request goes to the upstream.
    Redis keys are ``ambassador:cache:v1:<namespace>:<SHA-256 of the cache key>``.

    What Redis holds is input like any other (anyone who can write to it can
    write anything): at most ``max_entry_bytes`` and ``META_ALLOWANCE`` more are
    read of a value, and one that is not an entry this version wrote (``read_entry``),
    is larger, or is not a string at all is a miss, logged once per kind.
    """

    PREFIX = "ambassador:cache:v1:"
    META_ALLOWANCE = 16384  # the metadata line beyond the headers ``Entry.size`` counts
    shared = True

    def __init__(self, redis, max_entry_bytes: int) -> None:
        self.redis = redis
        self.max_entry_bytes = max_entry_bytes
        self._logged: set[str] = set()  # the kinds of bad entries logged already

    def get(self, key: str, now: float) -> defer.Deferred:
        return self.redis.get(self._redis_key(key), self.max_entry_bytes + self.META_ALLOWANCE).addCallbacks(
            self._found, self._unanswered)

    def put(self, key: str, entry: Entry, now: float) -> bool:
        ttl = entry.stored_at + entry.retention() - now
        if ttl <= 0 or entry.size > self.max_entry_bytes:
            return False
        self.redis.set(self._redis_key(key), encode_entry(entry), ttl).addErrback(self._unanswered)
        return True

    def _found(self, data: object) -> Entry | None:
        if data is None:
            return None
        try:
            if not isinstance(data, bytes):
                raise BadEntry("not-a-string")
            if len(data) > self.max_entry_bytes + self.META_ALLOWANCE:
                raise BadEntry("oversized")
            entry = read_entry(data)
            if entry.size > self.max_entry_bytes:
                raise BadEntry("oversized")
        except BadEntry as bad:
            self._bad(bad.kind)
            return None
        return entry

    def _unanswered(self, failure: Failure) -> None:
        failure.trap(StoreUnavailable)  # a miss; the store has logged why, unless Redis answered an error
        if failure.check(ErrorReply):
            self._bad("error-reply")  # a key of another type (WRONGTYPE), or a Redis out of memory
        return None

    def _bad(self, kind: str) -> None:
        if kind not in self._logged:
            self._logged.add(kind)
            log.warn("A shared cache entry in Redis was not usable ({kind}); such entries are cache misses "
                     "(this is logged once per kind)", kind=kind)

    def _redis_key(self, key: str) -> bytes:
        return redis_key(self.PREFIX, key)


class BadEntry(ValueError):
    """What a shared store or a peer gave is not an entry this version wrote; ``kind`` says how, in a word."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def encode_entry(entry: Entry) -> bytes:
    """An entry as bytes for a shared store: one JSON line of metadata, then the body."""
    return json.dumps(entry_meta(entry), separators=(",", ":")).encode() + b"\n" + entry.answer.body


def read_entry(data: bytes) -> Entry:
    """The entry ``encode_entry`` wrote; BadEntry when ``data`` is not one."""
    meta_line, newline, body = data.partition(b"\n")
    if not newline:
        raise BadEntry("unreadable")
    try:
        meta = json.loads(meta_line)
    except (ValueError, RecursionError):  # not JSON (or not UTF-8), or nested past Python's stack
        raise BadEntry("unreadable") from None
    return entry_of(meta, body)


def decode_entry(data: bytes) -> Entry | None:
    """The entry ``encode_entry`` wrote, or None when ``data`` is not one."""
    try:
        return read_entry(data)
    except BadEntry:
        return None


def entry_meta(entry: Entry) -> dict:
    """What is known about an entry besides its body, as JSON-able values."""
    return {
        "status": entry.answer.status, "headers": entry.answer.headers, "stored_at": entry.stored_at,
        "initial_age": entry.initial_age, "lifetime": entry.lifetime, "swr": entry.while_revalidate,
        "sie": entry.if_error, "etag": entry.etag, "last_modified": entry.last_modified, "vary": entry.vary,
    }


_META_KEYS = frozenset({"status", "headers", "stored_at", "initial_age", "lifetime", "swr", "sie", "etag", "last_modified",
                        "vary"})
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_CLEAN_VALUE = re.compile(r"[^\x00-\x08\x0a-\x1f\x7f]*\Z")  # no control character but tab (RFC 9110 5.5)
_MAX_HEADERS = 100


def entry_of(meta: object, body: bytes) -> Entry:
    """The entry ``entry_meta`` described; BadEntry (a ValueError) when ``meta`` is not that: every field of
    its type, a status the cache stores, header names that are tokens and values without control characters,
    finite times (what reaches the caller from it is as well-formed as what the upstream's answer made)."""
    if not isinstance(meta, dict) or not _META_KEYS <= meta.keys():
        raise BadEntry("unreadable")
    status = meta["status"]
    if type(status) is not int or status not in CACHEABLE_STATUSES:
        raise BadEntry("invalid-status")
    headers, vary = _header_pairs(meta["headers"]), _header_pairs(meta["vary"])
    numbers = [meta[name] for name in ("stored_at", "initial_age", "lifetime", "swr", "sie")]
    if not all(type(n) in (int, float) and math.isfinite(n) for n in numbers) or min(numbers[1], *numbers[3:]) < 0:
        raise BadEntry("invalid-time")
    etag, last_modified = meta["etag"], meta["last_modified"]
    if not all(v is None or (isinstance(v, str) and _CLEAN_VALUE.match(v)) for v in (etag, last_modified)):
        raise BadEntry("invalid-header")
    stored_at, initial_age, lifetime, swr, sie = map(float, numbers)
    return Entry(Answer(status, list(headers), body), stored_at, initial_age, lifetime, swr, sie, etag, last_modified,
                 vary)


def _header_pairs(pairs: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(pairs, (list, tuple)) or len(pairs) > _MAX_HEADERS:
        raise BadEntry("invalid-header")
    checked = []
    for pair in pairs:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(part, str) for part in pair)
                and _TOKEN.match(pair[0]) and _CLEAN_VALUE.match(pair[1])):
            raise BadEntry("invalid-header")
        checked.append((pair[0], pair[1]))
    return tuple(checked)
