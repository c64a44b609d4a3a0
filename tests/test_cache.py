"""The response cache over real HTTP: hits, misses, revalidation, coalescing, staleness and the
caller's say. A fake TMDB counts what reaches it; a Clock says when entries expire."""

import json
from email.utils import formatdate

import pytest
import pytest_twisted
from twisted.internet.defer import ensureDeferred
from twisted.python import usage

from ambassador.cache.responses import CallerWish, Entry, MemoryStore, decode_entry, encode_entry, parse_size
from ambassador.exchange import Answer
from ambassador.pipeline.resilience import Policy, resolve_policies
from ambassador.app.service import Options
from conftest import adapters_from_yaml, get, header, raw_exchange, reactor_turns_until, tmdb_env

KEY = {"TMDB_API_KEY": "test-api-key"}
MOVIE = "/tmdb/3/movie/550"


def page(**headers):
    """A canned TMDB answer with ``headers`` (underscores for dashes)."""
    named = {name.replace("_", "-"): value for name, value in headers.items()}
    return 200, {"Content-Type": "application/json", **named}, json.dumps({"page": 1, "results": []}).encode()


def failing(status):
    return status, {"Content-Type": "application/json"}, json.dumps({"status_code": 0, "status_message": "x"}).encode()


async def start(start_ambassador, fake, clock, **policy):
    return await start_ambassador(tmdb_env(fake, **KEY), clock=clock,
                                  policies={"tmdb": Policy(**{"retries": 0, **policy})})


async def ask(ambassador, path=MOVIE, **headers):
    response, body = await get(ambassador.url + path, headers={k.replace("_", "-"): v for k, v in headers.items()})
    return response.code, header(response, "cache-status"), header(response, "age"), body


@pytest_twisted.ensureDeferred
async def test_a_fresh_answer_is_served_from_the_cache_with_its_age(fake_tmdb, start_ambassador, clock, log_events):
    ambassador = await start(start_ambassador, fake_tmdb, clock)
    code, status, age, first = await ask(ambassador)
    assert (code, status, age) == (200, "ambassador; fwd=miss; fwd-status=200; stored", None)
    clock.advance(100)
    code, status, age, again = await ask(ambassador)
    assert (code, status, age, again) == (200, "ambassador; hit; ttl=21500", "100", first)
    assert len(fake_tmdb.requests) == 1
    assert [e["cache"] for e in log_events if e.get("log_namespace") == "ambassador.access"] == ["miss", "hit"]


@pytest_twisted.ensureDeferred
async def test_query_order_head_and_the_callers_own_key_share_one_entry(fake_tmdb, start_ambassador, clock):
    ambassador = await start(start_ambassador, fake_tmdb, clock)
    await ask(ambassador, "/movies?page=1&sort_by=vote_count.desc")
    _, status, _, _ = await ask(ambassador, "/movies?sort_by=vote_count.desc&api_key=caller-own-key&page=1")
    response, _ = await get(ambassador.url + "/movies?sort_by=vote_count.desc&page=1", method="HEAD")
    assert status.startswith("ambassador; hit") and header(response, "cache-status").startswith("ambassador; hit")
    assert len(fake_tmdb.requests) == 1
    _, status, _, _ = await ask(ambassador, "/movies?page=2&sort_by=vote_count.desc")  # another key
    assert status.startswith("ambassador; fwd=miss") and len(fake_tmdb.requests) == 2


@pytest_twisted.ensureDeferred
async def test_a_stale_entry_is_revalidated_and_a_304_refreshes_it(fake_tmdb, start_ambassador, clock):
    fake_tmdb.max_age = 60
    ambassador = await start(start_ambassador, fake_tmdb, clock)
    _, _, _, first = await ask(ambassador)
    clock.advance(61)
    code, status, age, body = await ask(ambassador)
    assert (code, status, age, body) == (200, "ambassador; fwd=stale; fwd-status=304", "0", first)
    etag = fake_tmdb.requests[0].headers.get("if-none-match")
    assert etag is None and fake_tmdb.requests[1].headers["if-none-match"].startswith('"')
    clock.advance(59)
    _, status, _, _ = await ask(ambassador)
    assert status == "ambassador; hit; ttl=1" and len(fake_tmdb.requests) == 2


@pytest_twisted.ensureDeferred
async def test_a_changed_answer_replaces_the_stale_entry(fake_tmdb, start_ambassador, clock):
    ambassador = await start(start_ambassador, fake_tmdb, clock)
    fake_tmdb.script = [page(Cache_Control="max-age=10", ETag='"v1"'), (200, {
        "Content-Type": "application/json", "Cache-Control": "max-age=10", "ETag": '"v2"'}, b'{"v": 2}')]
    await ask(ambassador)
    clock.advance(11)
    _, status, _, body = await ask(ambassador)
    assert status == "ambassador; fwd=stale; fwd-status=200; stored" and body == b'{"v": 2}'
    assert fake_tmdb.requests[1].headers["if-none-match"] == '"v1"'
    _, status, _, body = await ask(ambassador)
    assert status == "ambassador; hit; ttl=10" and body == b'{"v": 2}'


@pytest_twisted.ensureDeferred
async def test_200_simultaneous_cold_requests_make_one_upstream_request(fake_tmdb, start_ambassador, clock):
    calls = await callers_waiting_on_one_fetch(200, await start(start_ambassador, fake_tmdb, clock), fake_tmdb)
    assert len(fake_tmdb.requests) == 1
    fake_tmdb.canned = page(Cache_Control="max-age=60")
    fake_tmdb.release()
    answers = [await c for c in calls]
    assert {code for code, *_ in answers} == {200} and len({body for *_, body in answers}) == 1
    statuses = sorted(status for _, status, _, _ in answers)
    assert statuses == ["ambassador; fwd=miss; fwd-status=200; stored"] + \
        ["ambassador; fwd=miss; fwd-status=200; stored; collapsed"] * 199
    assert len(fake_tmdb.requests) == 1


def _waiting(ambassador) -> int:
    return sum(len(flight.waiters) for flight in ambassador.cache._flights.values())


async def callers_waiting_on_one_fetch(count: int, ambassador, fake) -> list:
    """``count`` callers of /movies, all waiting on the one upstream request the fake holds."""
    fake.fault = "hang"
    calls = [ensureDeferred(ask(ambassador, "/movies")) for _ in range(count)]
    await reactor_turns_until(lambda: _waiting(ambassador) == count and fake.hanging)
    return calls


@pytest_twisted.ensureDeferred
async def test_a_failure_reaches_every_coalesced_caller_without_retry_storms(fake_tmdb, start_ambassador, clock):
    calls = await callers_waiting_on_one_fetch(50, await start(start_ambassador, fake_tmdb, clock), fake_tmdb)
    fake_tmdb.hanging.pop().transport.abortConnection()
    answers = [await c for c in calls]
    assert {code for code, *_ in answers} == {502}
    assert {json.loads(body)["type"] for *_, body in answers} == {"urn:ambassador:problem:upstream-unreachable"}
    assert len(fake_tmdb.requests) == 1


@pytest_twisted.ensureDeferred
async def test_a_caller_who_leaves_does_not_cancel_the_fetch_others_wait_for(fake_tmdb, start_ambassador, clock):
    ambassador = await start(start_ambassador, fake_tmdb, clock)
    fake_tmdb.fault = "hang"
    leaving = ensureDeferred(ask(ambassador, "/movies"))
    await reactor_turns_until(lambda: _waiting(ambassador) == 1)
    staying = ensureDeferred(ask(ambassador, "/movies"))
    await reactor_turns_until(lambda: _waiting(ambassador) == 2)
    leaving.cancel()  # closes that caller's connection
    leaving.addErrback(lambda _: None)  # its request failed as cancelled: nobody reads that
    await reactor_turns_until(lambda: _waiting(ambassador) == 1)
    fake_tmdb.release()
    code, status, _, _ = await staying
    assert code == 200 and status.endswith("; collapsed") and len(fake_tmdb.requests) == 1


@pytest.mark.parametrize("fault", ["reset", failing(500), failing(503), failing(429)])
@pytest_twisted.ensureDeferred
async def test_stale_if_error_serves_the_stale_answer_within_its_window(fake_tmdb, start_ambassador, clock, fault):
    ambassador = await start(start_ambassador, fake_tmdb, clock, stale_if_error=300)
    fake_tmdb.max_age = 60
    _, _, _, first = await ask(ambassador)
    clock.advance(100)
    fake_tmdb.fault = fault if fault == "reset" else None
    fake_tmdb.canned = None if fault == "reset" else fault
    code, status, age, body = await ask(ambassador)
    forwarded = "" if fault == "reset" else f"; fwd-status={fault[0]}"
    assert (code, status, age, body) == (200, f"ambassador; fwd=stale{forwarded}; ttl=-40; detail=stale-if-error",
                                         "100", first)
    clock.advance(261)  # 361 s old: 301 s stale
    code, status, _, _ = await ask(ambassador)
    assert code >= 429 and status is None
    # Twisted's pool resends once when a reused connection is reset before any answer.
    assert len(fake_tmdb.requests) == 3 + (fault == "reset")


@pytest_twisted.ensureDeferred
async def test_stale_if_error_covers_an_open_circuit(fake_tmdb, start_ambassador, clock):
    ambassador = await start(start_ambassador, fake_tmdb, clock, stale_if_error=300, breaker_failures=1)
    fake_tmdb.max_age = 60
    await ask(ambassador)
    clock.advance(61)
    fake_tmdb.fault = "reset"
    await ask(ambassador)  # the upstream fails (the stale answer is served) and the circuit opens
    requests = len(fake_tmdb.requests)
    code, status, _, _ = await ask(ambassador)
    assert code == 200 and status == "ambassador; fwd=stale; ttl=-1; detail=stale-if-error"
    assert len(fake_tmdb.requests) == requests  # the open circuit sent nothing


@pytest_twisted.ensureDeferred
async def test_the_upstreams_own_stale_if_error_counts_and_must_revalidate_forbids_it(
        fake_tmdb, start_ambassador, clock):
    ambassador = await start(start_ambassador, fake_tmdb, clock)
    fake_tmdb.script = [page(Cache_Control="max-age=10, stale-if-error=60"),
                        page(Cache_Control="max-age=10, stale-if-error=60, must-revalidate")]
    await ask(ambassador, "/movies?a=1")
    await ask(ambassador, "/movies?a=2")
    clock.advance(30)
    fake_tmdb.canned = failing(500)
    assert (await ask(ambassador, "/movies?a=1"))[0] == 200
    assert (await ask(ambassador, "/movies?a=2"))[0] == 502


@pytest_twisted.ensureDeferred
async def test_stale_while_revalidate_answers_at_once_and_refreshes_behind(fake_tmdb, start_ambassador, clock):
    ambassador = await start(start_ambassador, fake_tmdb, clock)
    fake_tmdb.canned = page(Cache_Control="max-age=60, stale-while-revalidate=30")
    await ask(ambassador)
    clock.advance(70)
    fake_tmdb.fault = "hang"
    code, status, age, _ = await ask(ambassador)  # answered although the upstream does not answer
    assert (code, status, age) == (200, "ambassador; hit; ttl=-10; detail=stale-while-revalidate", "70")
    await reactor_turns_until(lambda: fake_tmdb.hanging)  # the refresh is under way
    fake_tmdb.canned = page(Cache_Control="max-age=60, stale-while-revalidate=30")
    fake_tmdb.release()
    await reactor_turns_until(lambda: not ambassador.cache._flights)
    _, status, age, _ = await ask(ambassador)
    assert (status, age) == ("ambassador; hit; ttl=60", "0") and len(fake_tmdb.requests) == 2


@pytest.mark.parametrize("headers", [
    {}, {"Cache-Control": "no-store, max-age=60"}, {"Cache-Control": "private, max-age=60"},
    {"Cache-Control": "max-age=0"}, {"Cache-Control": "max-age=60", "Vary": "*"},
    {"Expires": "0"},
], ids=["no-headers", "no-store", "private", "max-age-0", "vary-star", "invalid-expires"])
@pytest_twisted.ensureDeferred
async def test_answers_not_marked_cacheable_are_not_stored(fake_tmdb, start_ambassador, clock, headers):
    ambassador = await start(start_ambassador, fake_tmdb, clock)
    fake_tmdb.canned = page(**{k.replace("-", "_"): v for k, v in headers.items()})
    for _ in range(2):
        code, status, _, _ = await ask(ambassador)
        assert (code, status) == (200, "ambassador; fwd=miss; fwd-status=200")
    assert len(fake_tmdb.requests) == 2


@pytest_twisted.ensureDeferred
async def test_errors_are_not_stored_but_a_404_is(fake_tmdb, start_ambassador, clock):
    ambassador = await start(start_ambassador, fake_tmdb, clock)
    fake_tmdb.canned = (404, {"Content-Type": "application/json", "Cache-Control": "max-age=60"},
                        b'{"status_code": 34}')
    assert [(await ask(ambassador, "/movies?a=1"))[:2] for _ in range(2)] == [
        (404, "ambassador; fwd=miss; fwd-status=404; stored"), (404, "ambassador; hit; ttl=60")]
    fake_tmdb.canned = failing(500)[:1] + ({"Content-Type": "application/json", "Cache-Control": "max-age=60"},
                                            b"{}")
    assert [(await ask(ambassador, "/movies?a=2"))[0] for _ in range(2)] == [502, 502]
    assert len(fake_tmdb.requests) == 3


@pytest_twisted.ensureDeferred
async def test_expires_s_maxage_and_the_policy_ttls(fake_tmdb, start_ambassador, clock):
    ambassador = await start(start_ambassador, fake_tmdb, clock, cache_default_ttl=20)
    now = clock.seconds()
    fake_tmdb.script = [page(Date=formatdate(now, usegmt=True), Expires=formatdate(now + 120, usegmt=True)),
                        page(Cache_Control="max-age=5, s-maxage=50"), page()]
    for path in ("/movies?a=1", "/movies?a=2", "/movies?a=3"):
        await ask(ambassador, path)
    clock.advance(10)
    assert [(await ask(ambassador, path))[1] for path in ("/movies?a=1", "/movies?a=2", "/movies?a=3")] == [
        "ambassador; hit; ttl=110", "ambassador; hit; ttl=40", "ambassador; hit; ttl=10"]
    overriding = await start(start_ambassador, fake_tmdb, clock, cache_ttl=3)
    fake_tmdb.script = [page(Cache_Control="max-age=3600")]
    await ask(overriding, "/movies?a=4")
    assert (await ask(overriding, "/movies?a=4"))[1] == "ambassador; hit; ttl=3"


@pytest_twisted.ensureDeferred
async def test_the_caller_can_force_revalidation_or_bypass_the_cache(fake_tmdb, start_ambassador, clock):
    ambassador = await start(start_ambassador, fake_tmdb, clock)
    _, status, _, _ = await ask(ambassador, Cache_Control="no-store")
    assert status == "ambassador; fwd=bypass"
    _, status, _, _ = await ask(ambassador)
    assert status == "ambassador; fwd=miss; fwd-status=200; stored"  # the bypass stored nothing
    for wish in ({"Cache_Control": "no-cache"}, {"Cache_Control": "max-age=0"}, {"Pragma": "no-cache"}):
        _, status, _, _ = await ask(ambassador, **wish)
        assert status == "ambassador; fwd=request; fwd-status=304"
    assert len(fake_tmdb.requests) == 5 and "if-none-match" in fake_tmdb.requests[-1].headers


@pytest_twisted.ensureDeferred
async def test_no_cache_and_a_per_adapter_off_switch(fake_tmdb, start_ambassador, clock):
    for settings in ({"cache_bytes": None}, {"policies": {"tmdb": Policy(cache=False)}}):
        ambassador = await start_ambassador(tmdb_env(fake_tmdb, **KEY), clock=clock, **settings)
        before = len(fake_tmdb.requests)
        assert [(await ask(ambassador))[1] for _ in range(2)] == [None, None]
        assert len(fake_tmdb.requests) == before + 2


@pytest_twisted.ensureDeferred
async def test_an_answer_larger_than_an_eighth_of_the_cache_is_not_stored(fake_tmdb, start_ambassador, clock):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, **KEY), clock=clock, cache_bytes=8 * 1024)
    fake_tmdb.canned = (200, {"Content-Type": "application/json", "Cache-Control": "max-age=60"},
                        b'{"a": "' + b"x" * 1100 + b'"}')
    assert [(await ask(ambassador))[1] for _ in range(2)] == ["ambassador; fwd=miss; fwd-status=200"] * 2


def entry(body_size: int, stored_at: float = 0.0) -> Entry:
    return Entry(Answer(200, [], b"x" * body_size), stored_at, 0.0, 60.0, 0.0, 0.0)


def test_memory_store_evicts_least_recently_used_and_stays_within_its_bound():
    store = MemoryStore(16 * 1024)  # entries up to 2 KiB
    for n in range(40):
        assert store.put(f"k{n}", entry(1000), 0.0)
        assert store.bytes <= store.max_bytes
        store.find("k0", 0.0)  # k0 stays in use
    assert store.find("k0", 0.0) is not None and store.find("k1", 0.0) is None and store.find("k39", 0.0) is not None
    assert len(store) == 16 * 1024 // entry(1000).size and store.evictions == 40 - len(store)
    assert not store.put("big", entry(3000), 0.0) and store.find("big", 0.0) is None
    assert store.find("k39", 61.0) is None  # useless once past its lifetime (no validator, no stale window)


def test_entries_survive_a_round_trip_through_bytes():
    original = Entry(Answer(200, [("content-type", "application/json"), ("etag", '"a"')], b"\x00{}\n"),
                     1.8e9, 3.0, 60.0, 10.0, 300.0, '"a"', None, (("accept-language", "de"),))
    assert decode_entry(encode_entry(original)) == original
    assert decode_entry(b"not an entry") is None and decode_entry(b'{"status": 200}\n') is None


@pytest.mark.parametrize("headers, wish", [
    ({}, CallerWish()), ({"cache-control": "no-store"}, CallerWish(bypass=True)),
    ({"cache-control": "No-Cache"}, CallerWish(revalidate=True)),
    ({"cache-control": "max-age=0"}, CallerWish(revalidate=True)),
    ({"cache-control": "max-age=30"}, CallerWish()), ({"pragma": "no-cache"}, CallerWish(revalidate=True)),
])
def test_what_the_callers_cache_control_asks(headers, wish):
    assert CallerWish.of(headers) == wish


def test_cache_options(monkeypatch):
    options = Options()
    options.parseOptions(["--cache-size", "1MiB", "--policy", "tmdb.cache=off", "--policy", "stale_if_error=60"])
    assert options.settings.cache_bytes == 2**20 and not options.settings.policies["tmdb"].cache
    assert options.settings.policies["tmdb"].stale_if_error == 60
    options = Options()
    options.parseOptions(["--no-cache"])
    assert options.settings.cache_bytes is None
    monkeypatch.setenv("AMBASSADOR_WORKER", "")  # this process is the primary
    options = Options()
    options.parseOptions(["--workers", "2", "--cache-size", "1MiB"])
    assert options.settings.cache_bytes == 2**19  # each process's share of the Pod's bound
    with pytest.raises(usage.UsageError) as refused:
        Options().parseOptions(["--cache-size", "lots"])
    assert str(refused.value) == "--cache-size must be a number of bytes such as 64MiB, 512KiB or 1000000"
    with pytest.raises(usage.UsageError, match="cache must be on or off"):
        Options().parseOptions(["--policy", "cache=maybe"])
    assert parse_size("64MiB") == 64 * 2**20 and parse_size("500kB") == 500_000


async def start_shared(start_ambassador, fake, clock, redis):
    ambassador = await start_ambassador(tmdb_env(fake, **KEY), clock=clock, cache_url=redis.url(),
                                        policies={"tmdb": Policy(retries=0)})
    await reactor_turns_until(lambda: ambassador.readiness.cache_store.available)
    return ambassador


@pytest_twisted.ensureDeferred
async def test_replicas_share_answers_through_redis(fake_tmdb, start_ambassador, clock, start_redis):
    redis = await start_redis(password="test-redis-password")
    one, other = [await start_shared(start_ambassador, fake_tmdb, clock, redis) for _ in range(2)]
    fake_tmdb.max_age = 60
    _, status, _, body = await ask(one)
    assert status == "ambassador; fwd=miss; fwd-status=200; stored"
    clock.advance(10)
    assert await ask(other) == (200, "ambassador; hit; ttl=50", "10", body)
    clock.advance(51)
    _, status, _, _ = await ask(other)  # stale for both now: revalidated once, by whoever asks
    assert status == "ambassador; fwd=stale; fwd-status=304"
    assert (await ask(one))[1] == "ambassador; hit; ttl=60"
    assert len(fake_tmdb.requests) == 2
    [key] = (await redis.cli("--scan")).decode().split()
    assert key.startswith("ambassador:cache:v1:tmdb:") and "movie" not in key  # a hash, not the URL
    assert 0 < int(await redis.cli("PTTL", key)) <= (60 + 3600) * 1000  # kept an hour for revalidation


@pytest_twisted.ensureDeferred
async def test_without_redis_the_ambassador_serves_from_the_upstream_and_says_so(
        fake_tmdb, start_ambassador, clock, redis_server, log_events):
    ambassador = await start_shared(start_ambassador, fake_tmdb, clock, redis_server)
    await redis_server.stop()
    await reactor_turns_until(lambda: not ambassador.readiness.cache_store.available)
    assert [(await ask(ambassador))[:2] for _ in range(2)] == [(200, "ambassador; fwd=miss; fwd-status=200; stored")] * 2
    assert len(fake_tmdb.requests) == 2
    response, body = await get(ambassador.admin_url + "/readyz")
    report = json.loads(body)
    assert response.code == 200 and report["ready"] and report["cache"]["available"] is False
    assert "unreachable" in report["warnings"][0]
    _, metrics = await get(ambassador.admin_url + "/metrics")
    assert b"ambassador_cache_store_available 0.0" in metrics
    unreachable = [e for e in log_events if "unreachable" in str(e.get("log_format", ""))]
    assert len(unreachable) == 1
    await redis_server.start()
    clock.advance(0.1)  # the first reconnection wait
    await reactor_turns_until(lambda: ambassador.readiness.cache_store.available)
    await ask(ambassador)
    assert (await ask(ambassador))[1] == "ambassador; hit; ttl=21600"


def test_the_cache_url_option_never_shows_the_password(monkeypatch):
    options = Options()
    options.parseOptions(["--cache", "redis://:test-redis-password@10.0.0.7:6380/2"])
    assert options.settings.cache_url == "redis://:test-redis-password@10.0.0.7:6380/2"
    monkeypatch.setenv("AMBASSADOR_CACHE_URL", "redis://cache:6379")
    options = Options()
    options.parseOptions([])
    assert options.settings.cache_url == "redis://cache:6379"
    options = Options()
    options.parseOptions(["--cache", "memory"])
    assert options.settings.cache_url is None
    options = Options()
    options.parseOptions(["--cache", "rediss://:test-redis-password@10.0.0.7"])  # TLS
    assert options.settings.cache_url == "rediss://:test-redis-password@10.0.0.7"
    with pytest.raises(usage.UsageError) as refused:
        Options().parseOptions(["--cache", "redis://:test-redis-password@10.0.0.7:port"])
    assert "port" in str(refused.value) and "test-redis-password" not in str(refused.value)


@pytest_twisted.ensureDeferred
async def test_a_caller_that_has_the_answer_already_gets_304(fake_tmdb, start_ambassador, clock):
    ambassador = await start(start_ambassador, fake_tmdb, clock)
    response, _ = await get(ambassador.url + MOVIE)
    etag = header(response, "etag")
    for offered in (etag, f'W/{etag}, "other"', "*"):
        code, status, _, body = await ask(ambassador, If_None_Match=offered)
        assert (code, status, body) == (304, "ambassador; hit; ttl=21600", b"")
    assert (await ask(ambassador, If_None_Match='"other"'))[0] == 200
    assert len(fake_tmdb.requests) == 1


@pytest_twisted.ensureDeferred
async def test_a_304_to_the_caller_is_well_formed(fake_tmdb, start_ambassador, clock):
    ambassador = await start(start_ambassador, fake_tmdb, clock)
    response, _ = await get(ambassador.url + MOVIE)
    raw = (f"GET {MOVIE} HTTP/1.1\r\nHost: x\r\nIf-None-Match: {header(response, 'etag')}\r\n"
           "Connection: close\r\n\r\n").encode()
    status, headers, body = await raw_exchange(ambassador.url, raw)
    assert (status, body) == (304, b"") and "content-length" not in headers and headers["etag"]


def test_an_entry_matches_only_the_request_headers_it_varies_on():
    varying = Entry(Answer(200, [], b""), 0.0, 0.0, 60.0, 0.0, 0.0, vary=(("accept-language", "de"),))
    assert varying.matches({"Accept-Language": "de", "X-Other": "1"})
    assert not varying.matches({"Accept-Language": "fr"}) and not varying.matches({})
    assert entry(10).matches({"Accept-Language": "fr"})


def test_the_config_file_sets_cache_keys_per_adapter(tmp_path):
    adapters = adapters_from_yaml(tmp_path, "adapters:\n  w:\n    mount: /w\n    base_url: https://x.example\n"
                                  "    policy: {cache: off, cache_ttl: null, stale_if_error: 60}\n"
                                  "    credential: {style: bearer, secret: {env: K}}", {"K": "k"})
    [policy] = resolve_policies(adapters, []).values()
    assert (policy.cache, policy.cache_ttl, policy.stale_if_error) == (False, None, 60)
