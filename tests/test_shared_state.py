"""State shared by replicas through a real redis-server: one rate limit, one back-off, and namespaces
that keep ambassadors with other upstreams or credentials apart. Each "replica" is an ambassador in
this process; the rate limit runs on Redis' own clock, so the limits used here are slow enough (a
token every two seconds or less) that the few requests of a test always fall in one window."""

import json
import signal

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater
from twisted.python import usage

from ambassador.app.service import Options
from ambassador.pipeline.resilience import Policy
from conftest import get, header, reactor_turns_until, tmdb_env

KEY = {"TMDB_API_KEY": "test-api-key"}
#: A token every two seconds, a burst of three, no queue, no cache: every request is one upstream attempt.
SLOW = Policy(retries=0, cache=False, rate_limit=0.5, rate_burst=3, rate_queue=0)


async def replica(start_ambassador, fake, clock, redis, policy=SLOW, environ=KEY, url=None, **settings):
    ambassador = await start_ambassador(tmdb_env(fake, **environ), clock=clock, cache_url=url or redis.url(),
                                        policies={"tmdb": policy}, **settings)
    await reactor_turns_until(lambda: ambassador.readiness.cache_store.available)
    return ambassador


async def codes(ambassador, count: int, path: str = "/tmdb/3/movie/550") -> list[int]:
    return [(await get(ambassador.url + path))[0].code for _ in range(count)]


async def metric_lines(ambassador, name: str) -> list[str]:
    _, body = await get(ambassador.admin_url + "/metrics")
    return [line for line in body.decode().splitlines() if line.startswith(name)]


@pytest_twisted.ensureDeferred
async def test_replicas_share_one_rate_limit(fake_tmdb, start_ambassador, clock, redis_server):
    one, other = [await replica(start_ambassador, fake_tmdb, clock, redis_server) for _ in range(2)]
    answered = await codes(one, 2) + await codes(other, 2) + await codes(one, 1)
    assert answered == [200, 200, 200, 429, 429]  # a burst of three for the two together
    assert len(fake_tmdb.requests) == 3
    [key] = [k for k in (await redis_server.cli("--scan")).decode().split() if ":ratelimit:" in k]
    assert key.startswith("ambassador:ratelimit:v1:tmdb:") and "test-api-key" not in key


@pytest_twisted.ensureDeferred
async def test_the_limit_is_shared_as_an_acl_user(fake_tmdb, start_ambassador, clock, start_redis):
    redis = await start_redis(password="test-redis-password", users={"ambassador": "test-acl-password"})
    url = redis.url(user="ambassador", password="test-acl-password")
    one, other = [await replica(start_ambassador, fake_tmdb, clock, redis, url=url) for _ in range(2)]
    assert await codes(one, 3) + await codes(other, 1) == [200, 200, 200, 429]


@pytest_twisted.ensureDeferred
async def test_a_retry_after_seen_by_one_replica_holds_back_every_replica(
        fake_tmdb, start_ambassador, clock, redis_server):
    policy = Policy(retries=0, cache=False, rate_limit=10, rate_queue=1)
    one, other = [await replica(start_ambassador, fake_tmdb, clock, redis_server, policy) for _ in range(2)]
    fake_tmdb.script = [(429, {"Content-Type": "application/json", "Retry-After": "30"}, b'{"status_code": 25}')]
    assert await codes(one, 1) == [429]
    response, body = await get(other.url + "/tmdb/3/movie/550")
    assert response.code == 429 and json.loads(body)["type"].endswith(":rate-limited")
    assert 29 <= int(header(response, "retry-after")) <= 31
    assert len(fake_tmdb.requests) == 1  # the other replica did not ask


@pytest_twisted.ensureDeferred
async def test_a_503_with_retry_after_holds_back_every_replica_too(fake_tmdb, start_ambassador, clock, redis_server):
    policy = Policy(retries=0, cache=False, rate_limit=10, rate_queue=1)
    one, other = [await replica(start_ambassador, fake_tmdb, clock, redis_server, policy) for _ in range(2)]
    fake_tmdb.script = [(503, {"Content-Type": "application/json", "Retry-After": "20"}, b'{"status_code": 9}')]
    await codes(one, 1)
    assert await codes(other, 1) == [429] and len(fake_tmdb.requests) == 1


@pytest_twisted.ensureDeferred
async def test_other_credentials_or_upstreams_share_nothing(fake_tmdb, serve_fake, start_ambassador, clock,
                                                            redis_server):
    fake_tmdb.api_keys.add("another-api-key")
    policy = Policy(retries=0, rate_limit=0.5, rate_burst=1, rate_queue=0)  # one request each, cache on
    one = await replica(start_ambassador, fake_tmdb, clock, redis_server, policy)
    other_key = await replica(start_ambassador, fake_tmdb, clock, redis_server, policy,
                              environ={"TMDB_API_KEY": "another-api-key"})
    same = await replica(start_ambassador, fake_tmdb, clock, redis_server, policy)
    assert await codes(one, 1) == [200]
    assert await codes(other_key, 1) == [200]  # its own bucket, and not the first one's cache entry
    assert len(fake_tmdb.requests) == 2
    assert await codes(same, 1) == [200] and len(fake_tmdb.requests) == 2  # the first one's entry
    keys = (await redis_server.cli("--scan")).decode().split()
    cache_keys = [k for k in keys if k.startswith("ambassador:cache:v1:tmdb:")]
    assert len(cache_keys) == 2 and len({k.rsplit(":", 1)[0] for k in cache_keys}) == 2
    assert not [k for k in keys if "api-key" in k]


@pytest_twisted.ensureDeferred
async def test_without_redis_each_replica_keeps_its_share_and_the_shared_limit_resumes(
        fake_tmdb, start_ambassador, clock, redis_server, log_events):
    policy = Policy(retries=0, cache=False, rate_limit=0.5, rate_burst=4, rate_queue=0)
    ambassador = await replica(start_ambassador, fake_tmdb, clock, redis_server, policy, replicas_hint=2)
    assert await metric_lines(ambassador, "ambassador_rate_limit_mode") == [
        'ambassador_rate_limit_mode{adapter="tmdb",mode="shared"} 1.0',
        'ambassador_rate_limit_mode{adapter="tmdb",mode="local"} 0.0']
    await redis_server.stop()
    await reactor_turns_until(lambda: not ambassador.readiness.cache_store.available)
    assert await codes(ambassador, 3) == [200, 200, 429]  # a burst of 4 over 2 replicas
    response, _ = await get(ambassador.admin_url + "/readyz")
    assert response.code == 200
    assert 'ambassador_rate_limit_mode{adapter="tmdb",mode="local"} 1.0' in await metric_lines(
        ambassador, "ambassador_rate_limit_mode")
    alone = [e for e in log_events if "enforced by each replica alone" in e.get("log_format", "")]
    assert len(alone) == 1 and alone[0]["replicas"] == 2
    await redis_server.start()
    clock.advance(0.1)  # the first reconnection wait
    await reactor_turns_until(lambda: ambassador.readiness.cache_store.available)
    assert 'ambassador_rate_limit_mode{adapter="tmdb",mode="shared"} 1.0' in await metric_lines(
        ambassador, "ambassador_rate_limit_mode")
    assert await codes(ambassador, 5) == [200] * 4 + [429]  # Redis' bucket, fresh: the whole burst


@pytest_twisted.ensureDeferred
async def test_a_bucket_in_redis_that_is_not_ours_is_ignored(fake_tmdb, start_ambassador, clock, redis_server):
    ambassador = await replica(start_ambassador, fake_tmdb, clock, redis_server)
    assert await codes(ambassador, 1) == [200]
    [key] = [k for k in (await redis_server.cli("--scan")).decode().split() if ":ratelimit:" in k]
    for garbage in ("not a number", "1e300", "-5"):
        await redis_server.cli("SET", key, garbage)
        assert await codes(ambassador, 1) == [200]


@pytest_twisted.ensureDeferred
async def test_a_shared_limit_without_a_replicas_hint_warns_once_at_startup(
        fake_tmdb, start_ambassador, clock, redis_server, log_events):
    await replica(start_ambassador, fake_tmdb, clock, redis_server)
    warned = [e for e in log_events if "--replicas-hint" in e.get("log_format", "")]
    assert len(warned) == 1
    await replica(start_ambassador, fake_tmdb, clock, redis_server, replicas_hint=3)
    assert len([e for e in log_events if "--replicas-hint" in e.get("log_format", "")]) == 1


def test_the_replicas_hint_option():
    options = Options()
    options.parseOptions(["--replicas-hint", "3"])
    assert options.settings.replicas_hint == 3
    for bad in ("0", "-2", "three"):
        with pytest.raises(usage.UsageError) as refused:
            Options().parseOptions(["--replicas-hint", bad])
        assert "--replicas-hint" in str(refused.value) and bad not in str(refused.value).replace("--replicas-hint", "")


CACHED = (200, {"Content-Type": "application/json", "Cache-Control": "public, max-age=60"}, b'{"id": 550}')
UNSTORED = (200, {"Content-Type": "application/json", "Cache-Control": "no-store"}, b'{"id": 550}')
#: Cache on, no rate limit: what is measured is how often the upstream is asked.
CACHING = Policy(retries=0, rate_limit=None, timeout=10)


async def lease_keys(redis) -> list[str]:
    return [k for k in (await redis.cli("--scan")).decode().split() if k.startswith("ambassador:lease:v1:tmdb:")]


async def settle(clock, condition, step=0.025):
    """Let loopback I/O happen and the replicas' looks for the entry come round, until ``condition()``."""
    for _ in range(400):
        await reactor_turns_until(lambda: True)
        if condition():
            return
        clock.advance(step)
        await deferLater(reactor, 0.001, lambda: None)  # a real millisecond: Redis' replies arrive
    raise AssertionError("condition never held")


async def one_fetching_one_waiting(start_ambassador, fake, clock, redis, answer):
    """Two replicas asked for one URL: the first one's fetch hangs (it will answer ``answer``), the
    other has looked for the entry for 0.2 s. Returns both calls and when the second one started."""
    holder, other = [await replica(start_ambassador, fake, clock, redis, CACHING) for _ in range(2)]
    fake.fault, fake.canned = "hang", answer
    fetching = ensureDeferred(get(holder.url + "/tmdb/3/movie/550"))
    await reactor_turns_until(lambda: len(fake.hanging) == 1)
    waiting, start = ensureDeferred(get(other.url + "/tmdb/3/movie/550")), clock.seconds()
    await settle(clock, lambda: clock.seconds() >= start + 0.2)
    return fetching, waiting, start


@pytest_twisted.ensureDeferred
async def test_300_cold_requests_over_3_replicas_make_one_upstream_request(
        fake_tmdb, start_ambassador, clock, redis_server):
    replicas = [await replica(start_ambassador, fake_tmdb, clock, redis_server, CACHING) for _ in range(3)]
    fake_tmdb.fault, fake_tmdb.canned = "hang", CACHED
    calls = [ensureDeferred(get(r.url + "/tmdb/3/movie/550")) for r in replicas for _ in range(100)]
    await reactor_turns_until(lambda: len(fake_tmdb.hanging) == 1)
    start = clock.seconds()
    await settle(clock, lambda: clock.seconds() >= start + 0.3)  # the others are looking by now
    assert len(fake_tmdb.requests) == 1 and len(await lease_keys(redis_server)) == 1
    fake_tmdb.fault = None
    fake_tmdb.release()
    await settle(clock, lambda: all(call.called for call in calls))
    answers = [await call for call in calls]
    assert {response.code for response, _ in answers} == {200} and {body for _, body in answers} == {b'{"id": 550}'}
    assert len(fake_tmdb.requests) == 1
    assert await lease_keys(redis_server) == []  # released once the entry was stored


@pytest_twisted.ensureDeferred
async def test_a_lease_holder_that_hangs_frees_the_key_when_its_lease_expires(
        fake_tmdb, start_ambassador, clock, redis_server):
    hung, waiting, start = await one_fetching_one_waiting(start_ambassador, fake_tmdb, clock, redis_server, CACHED)
    assert not waiting.called and len(fake_tmdb.requests) == 1
    [lease] = await lease_keys(redis_server)
    assert 0 < int(await redis_server.cli("PTTL", lease)) <= 10_000  # the adapter's timeout
    fake_tmdb.fault = None
    await redis_server.cli("PEXPIRE", lease, "1")  # as if its time had run out
    await settle(clock, lambda: waiting.called)
    response, _ = await waiting
    assert response.code == 200 and len(fake_tmdb.requests) == 2 and not hung.called
    fake_tmdb.release()
    await settle(clock, lambda: hung.called)


@pytest_twisted.ensureDeferred
async def test_an_answer_that_cannot_be_stored_frees_the_key_at_once(fake_tmdb, start_ambassador, clock,
                                                                   redis_server):
    first, waiting, start = await one_fetching_one_waiting(start_ambassador, fake_tmdb, clock, redis_server,
                                                           UNSTORED)
    fake_tmdb.fault = None
    fake_tmdb.release()
    await settle(clock, lambda: first.called and waiting.called)
    assert (await waiting)[0].code == 200 and len(fake_tmdb.requests) == 2
    assert clock.seconds() - start < 1  # the next look took the freed lease; nobody waited out the timeout


@pytest_twisted.ensureDeferred
async def test_a_waiting_replica_fetches_itself_after_its_adapters_timeout(
        fake_tmdb, start_ambassador, clock, redis_server):
    holder = await replica(start_ambassador, fake_tmdb, clock, redis_server, CACHING)  # holds for 10 s
    other = await replica(start_ambassador, fake_tmdb, clock, redis_server, Policy(retries=0, rate_limit=None,
                                                                                   timeout=2))
    fake_tmdb.fault, fake_tmdb.canned = "hang", CACHED
    hung = ensureDeferred(get(holder.url + "/tmdb/3/movie/550"))
    await reactor_turns_until(lambda: len(fake_tmdb.hanging) == 1)
    fake_tmdb.fault = None
    waiting, start = ensureDeferred(get(other.url + "/tmdb/3/movie/550")), clock.seconds()
    await settle(clock, lambda: clock.seconds() >= start + 1.7)
    assert not waiting.called and len(fake_tmdb.requests) == 1
    await settle(clock, lambda: waiting.called)
    assert (await waiting)[0].code == 200 and len(fake_tmdb.requests) == 2
    assert 1.7 <= clock.seconds() - start <= 2.1
    assert len(await lease_keys(redis_server)) == 1  # still the hung holder's
    fake_tmdb.release()
    await settle(clock, lambda: hung.called)


@pytest_twisted.ensureDeferred
async def test_two_replicas_of_two_workers_hold_one_limit(fake_tmdb, redis_server, tmp_path):
    """Real processes: two ambassadors of ``--workers 2`` each (four processes), one Redis. A burst of
    three for the Deployment, and a token every 20 s after it: whatever process each request reaches,
    exactly three go upstream."""
    from processes import spawn_ambassador
    from test_workers import Watched, both_serving

    urls, processes = [], []
    try:
        for replica_number in range(2):
            directory = tmp_path / f"replica-{replica_number}"
            directory.mkdir()
            process = spawn_ambassador(
                "--port", "0", "--admin-port", "tcp:0:interface=127.0.0.1", "--workers", "2", "--adapter", "tmdb",
                "--log-format", "json", "--cache", redis_server.url(), "--replicas-hint", "2",
                "--policy", "tmdb.rate_limit=0.05", "--policy", "tmdb.rate_burst=3", "--policy", "tmdb.rate_queue=0",
                "--policy", "tmdb.retries=0", "--policy", "tmdb.cache=off",
                env=tmdb_env(fake_tmdb, TMDB_API_KEY="test-api-key"), cwd=directory)
            processes.append(process)
            url, _ = await both_serving(process, Watched(process))
            urls.append(url)
        answered = [(await get(urls[n % 2] + "/tmdb/3/movie/550"))[0].code for n in range(16)]
        assert sorted(answered) == [200] * 3 + [429] * 13, answered
        assert len(fake_tmdb.requests) == 3
    finally:
        for process in processes:
            process.transport.signalProcess(signal.SIGTERM)
    for process in processes:
        assert await process.ended == (0, None), process.output.decode()
