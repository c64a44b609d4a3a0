"""The Redis store of the shared cache against a real redis-server on loopback.

Round trips, TTLs, AUTH, SELECT, an outage and a restart, a Redis that does
not answer. Command timeouts and reconnection waits run on the test's Clock;
real time is only waited for (with a deadline) where a real process acts.
"""

import math
import os
import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent

from ambassador.cache.redisstore import (BACKOFF_FIRST, BACKOFF_MAX, RedisStore, RESPConnection, StoreUnavailable,
                                   parse_redis_url)

PASSWORD = "test-redis-password"


async def turns_until(condition, give_up_after=10.0):
    """Let the reactor run (no time passes on the Clock) until ``condition()`` holds: loopback I/O
    gets done, a process acts. Gives up after ``give_up_after`` real seconds."""
    give_up = time.monotonic() + give_up_after
    while not condition():
        if time.monotonic() > give_up:
            raise AssertionError("condition never held")
        await deferLater(reactor, 0, lambda: None)


@pytest.fixture
def clock():
    return Clock()


@pytest_twisted.async_yield_fixture
async def open_store(clock):
    """``await open_store(url, on_change=..., timeout=...)``: a started RedisStore timed by the test's
    Clock, once its first connection attempt has an outcome; stopped after the test."""
    stores = []

    async def open_(url, *, on_change=None, **options):
        outcomes = []

        def changed(available):
            outcomes.append(available)
            if on_change is not None:
                on_change(available)

        store = RedisStore(url, reactor, clock=clock, on_change=changed, **options)
        stores.append(store)
        store.start()
        await turns_until(lambda: outcomes)
        return store

    yield open_
    for store in stores:
        await store.stop()


def failure_of(deferred) -> Exception:
    """The exception ``deferred`` has already failed with."""
    failures = []
    deferred.addErrback(failures.append)
    assert failures, "the Deferred has not failed (yet)"
    return failures[0].value


def events_about(log_events, store) -> list[str]:
    return [formatEvent(e) for e in log_events if e.get("redis") == store.description]


def retry_delays(clock) -> list[float]:
    return [call.getTime() - clock.seconds() for call in clock.getDelayedCalls()]


@pytest_twisted.ensureDeferred
async def test_values_round_trip_byte_for_byte(redis_server, open_store):
    store = await open_store(redis_server.url())
    assert store.available
    values = {
        b"plain": b"hello",
        b"empty": b"",
        b"\x00binary key\r\n": bytes(range(256)) * 4,
        b"looks like RESP": b"$-1\r\n+OK\r\n-ERR no\r\n:1\r\n*2\r\n",
        b"large": os.urandom(3 * 1024 * 1024),  # arrives in many reads
    }
    await gatherResults([store.set(key, value, ttl=60) for key, value in values.items()])
    got = await gatherResults([store.get(key) for key in values])
    assert dict(zip(values, got)) == values
    assert await redis_server.cli("GET", "plain") == b"hello\n"  # what is in Redis is the bytes, as they are


@pytest_twisted.ensureDeferred
async def test_missing_key_is_none(redis_server, open_store):
    store = await open_store(redis_server.url())
    assert await store.get(b"never set") is None


@pytest_twisted.ensureDeferred
async def test_pipelined_replies_go_to_their_own_commands(redis_server, open_store):
    store = await open_store(redis_server.url())
    keys = [b"key-%d" % n for n in range(400)]
    await gatherResults([store.set(key, key.upper() * (n % 7), ttl=60) for n, key in enumerate(keys[::2])])
    got = await gatherResults([store.get(key) for key in keys])  # all sent before the first reply
    assert got == [key.upper() * (n // 2 % 7) if n % 2 == 0 else None for n, key in enumerate(keys)]


@pytest_twisted.ensureDeferred
async def test_ttl_is_sent_in_milliseconds_rounded_up(redis_server, open_store):
    store = await open_store(redis_server.url())
    await store.set(b"k", b"v", ttl=2.0001)
    assert 1000 < int(await redis_server.cli("PTTL", "k")) <= 2001


@pytest_twisted.ensureDeferred
async def test_an_expired_value_is_gone(redis_server, open_store):
    store = await open_store(redis_server.url())
    await store.set(b"short-lived", b"v", ttl=0.005)
    give_up = time.monotonic() + 5
    while await store.get(b"short-lived") is not None:  # Redis expires it, in its own real time
        assert time.monotonic() < give_up, "the value did not expire"


@pytest.mark.parametrize("ttl", [0, -1, math.nan, math.inf])
def test_ttl_must_be_a_positive_number_of_seconds(ttl):
    store = RedisStore("redis://127.0.0.1:1/0", reactor)
    with pytest.raises(ValueError, match="positive"):
        store.set(b"k", b"v", ttl=ttl)


@pytest_twisted.ensureDeferred
async def test_password_is_sent_in_auth_and_shown_nowhere(start_redis, open_store, log_events):
    server = await start_redis(password=PASSWORD)
    store = await open_store(server.url())
    await store.set(b"k", b"with a password", ttl=60)
    assert await store.get(b"k") == b"with a password"
    assert await server.cli("GET", "k") == b"with a password\n"
    assert store.description == f"redis://127.0.0.1:{server.port}/0"
    assert PASSWORD not in repr(store) and PASSWORD not in repr(parse_redis_url(server.url()))
    assert events_about(log_events, store) == [f"Redis cache {store.description} is connected"]


@pytest_twisted.ensureDeferred
async def test_user_name_is_sent_in_auth(start_redis, open_store):
    server = await start_redis(password=PASSWORD, users={"alice": "alice-redis-password"})
    # alice's password is not the default user's: this works only if AUTH names alice
    store = await open_store(server.url(user="alice", password="alice-redis-password"))
    assert store.available
    await store.set(b"k", b"alice was here", ttl=60)
    assert await server.cli("GET", "k") == b"alice was here\n"


@pytest.mark.parametrize("password, said", [("wrong-redis-password", "WRONGPASS"), ("", "NOAUTH")])
@pytest_twisted.ensureDeferred
async def test_wrong_or_missing_password_leaves_the_store_unavailable(start_redis, open_store, log_events,
                                                                      password, said):
    server = await start_redis(password=PASSWORD)
    changes = []
    store = await open_store(server.url(password=password), on_change=changes.append)
    assert changes == [False] and not store.available
    error = failure_of(store.get(b"k"))
    assert isinstance(error, StoreUnavailable) and "not connected" in str(error)
    [event] = events_about(log_events, store)
    assert "is unreachable" in event and said in event
    assert "wrong-redis-password" not in event + str(error) + repr(store)  # log_events checks every event too


@pytest_twisted.ensureDeferred
async def test_select_keeps_databases_apart(redis_server, open_store):
    zero, five = await open_store(redis_server.url(db=0)), await open_store(redis_server.url(db=5))
    assert five.description.endswith("/5")
    await zero.set(b"k", b"in 0", ttl=60)
    assert await five.get(b"k") is None
    await five.set(b"k", b"in 5", ttl=60)
    assert (await zero.get(b"k"), await five.get(b"k")) == (b"in 0", b"in 5")
    assert await redis_server.cli("GET", "k", db=5) == b"in 5\n"


@pytest_twisted.ensureDeferred
async def test_error_reply_fails_only_its_command(redis_server, open_store):
    store = await open_store(redis_server.url())
    await redis_server.cli("RPUSH", "a-list", "x")
    await store.set(b"k", b"v", ttl=60)
    with pytest.raises(StoreUnavailable, match="WRONGTYPE"):
        await store.get(b"a-list")
    assert store.available and await store.get(b"k") == b"v"


@pytest_twisted.ensureDeferred
async def test_outage_fails_at_once_and_a_restart_reconnects_with_capped_backoff(redis_server, open_store,
                                                                                 clock, log_events):
    changes = []
    store = await open_store(redis_server.url(), on_change=changes.append)
    await store.set(b"k", b"v", ttl=60)

    await redis_server.stop()
    await turns_until(lambda: not store.available)
    assert changes == [True, False]
    for _ in range(3):  # no waiting for a timeout: the store knows it is not connected
        assert isinstance(failure_of(store.get(b"k")), StoreUnavailable)
        assert isinstance(failure_of(store.set(b"k", b"v", ttl=60)), StoreUnavailable)

    # Every attempt is refused; the wait before the next one doubles up to the cap.
    expected = [BACKOFF_FIRST * 2 ** n for n in range(6)] + [BACKOFF_MAX] * 2
    assert expected[:7] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0])
    for delay, following in zip(expected, expected[1:]):
        await turns_until(lambda: retry_delays(clock) == pytest.approx([delay]))
        clock.advance(delay)
        await turns_until(lambda: retry_delays(clock) == pytest.approx([following]))
    assert changes == [True, False] and not store.available

    await redis_server.start()  # the same port, and empty: it kept nothing
    clock.advance(BACKOFF_MAX)
    await turns_until(lambda: store.available)
    assert changes == [True, False, True]
    assert await store.get(b"k") is None
    await store.set(b"k", b"again", ttl=60)
    assert await store.get(b"k") == b"again"

    unreachable, again = events_about(log_events, store)[1:]  # once each, however many attempts and calls
    assert unreachable.startswith(f"Redis cache {store.description} is unreachable: connection lost")
    assert again == f"Redis cache {store.description} is reachable again"


@pytest_twisted.ensureDeferred
async def test_a_command_without_answer_fails_after_the_timeout_and_replies_stay_in_step(
        redis_server, open_store, clock, log_events):
    changes = []
    store = await open_store(redis_server.url(), on_change=changes.append, timeout=0.25)
    await store.set(b"one", b"1", ttl=60)
    await store.set(b"two", b"2", ttl=60)

    redis_server.pause()  # connected, but nothing is answered
    first, second = store.get(b"one"), store.get(b"two")
    clock.advance(0.24)
    await deferLater(reactor, 0, lambda: None)
    assert not first.called and store.available
    clock.advance(0.01)
    for call in (first, second):
        error = failure_of(call)
        assert isinstance(error, StoreUnavailable) and "no answer within 0.25 s" in str(error)
    assert changes == [True, False] and not store.available
    assert "no answer within 0.25 s" in events_about(log_events, store)[-1]

    # The connection those late replies would come on is gone: a new one answers each command its own.
    redis_server.resume()
    clock.advance(BACKOFF_FIRST)
    await turns_until(lambda: store.available)
    assert changes == [True, False, True]
    assert (await store.get(b"two"), await store.get(b"one")) == (b"2", b"1")


@pytest_twisted.ensureDeferred
async def test_stop_closes_the_connection_and_stops_reconnecting(redis_server, open_store, clock):
    store = await open_store(redis_server.url())
    await store.stop()
    assert not store.available and clock.getDelayedCalls() == []
    assert isinstance(failure_of(store.get(b"k")), StoreUnavailable)
    give_up = time.monotonic() + 10
    while b"connected_clients:1\r" not in await redis_server.cli("INFO", "clients"):  # only redis-cli itself
        assert time.monotonic() < give_up, "the store's connection stayed open"


@pytest_twisted.ensureDeferred
async def test_stop_while_unreachable_stops_reconnecting(open_store, clock):
    changes = []
    store = await open_store("redis://127.0.0.1:1/0", on_change=changes.append)  # nothing listens on port 1
    assert changes == [False] and retry_delays(clock) == pytest.approx([BACKOFF_FIRST])
    await store.stop()
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize("url, host, port, db, username, password, description", [
    ("redis://cache:6380/2", "cache", 6380, 2, None, None, "redis://cache:6380/2"),
    ("redis://cache", "cache", 6379, 0, None, None, "redis://cache:6379/0"),
    ("redis://cache/", "cache", 6379, 0, None, None, "redis://cache:6379/0"),
    (f"redis://:{PASSWORD}@cache/1", "cache", 6379, 1, None, PASSWORD, "redis://cache:6379/1"),
    (f"redis://alice:{PASSWORD}@10.0.0.7:7000", "10.0.0.7", 7000, 0, "alice", PASSWORD, "redis://10.0.0.7:7000/0"),
    ("redis://:p%40ss%3Aword@cache", "cache", 6379, 0, None, "p@ss:word", "redis://cache:6379/0"),
    ("redis://[::1]:6379/3", "::1", 6379, 3, None, None, "redis://[::1]:6379/3"),
])
def test_url_forms(url, host, port, db, username, password, description):
    address = parse_redis_url(url)
    assert (address.host, address.port, address.db, address.username, address.password) == (
        host, port, db, username, password)
    assert RedisStore(url, reactor).description == description


@pytest.mark.parametrize("url, why", [
    (f"http://:{PASSWORD}@cache/0", "redis://"),
    (f"rediss://:{PASSWORD}@cache/0", "redis://"),
    (f"redis://:{PASSWORD}@/0", "host"),
    (f"redis://:{PASSWORD}@cache:port/0", "port"),
    (f"redis://:{PASSWORD}@cache:70000/0", "port"),
    (f"redis://:{PASSWORD}@cache/zero", "database"),
    (f"redis://:{PASSWORD}@cache/0/1", "database"),
    (f"redis://cache/0?password={PASSWORD}", "query"),
    (f"redis://{PASSWORD}@cache/0", "needs a password"),
    (f"redis://:{PASSWORD}@[::1/0", "URL"),
])
def test_malformed_urls_are_refused_without_showing_the_password(url, why):
    with pytest.raises(ValueError) as refused:
        RedisStore(url, reactor)
    message = str(refused.value)
    assert why in message and "redis://[[user]:password@]host[:port][/db]" in message
    assert PASSWORD not in message


@pytest_twisted.ensureDeferred
async def test_a_host_name_is_resolved(redis_server, open_store):
    store = await open_store(f"redis://localhost:{redis_server.port}/0")
    assert store.available and await store.get(b"k") is None


def connection_with(clock=None) -> tuple[RESPConnection, StringTransport]:
    connection, transport = RESPConnection(clock or Clock(), timeout=1.0), StringTransport()
    connection.makeConnection(transport)
    return connection, transport


def test_every_resp2_reply_kind_is_read_even_a_byte_at_a_time():
    connection, transport = connection_with()
    commands = [connection.command(b"X", n) for n in range(7)]
    assert transport.value().startswith(b"*2\r\n$1\r\nX\r\n$1\r\n0\r\n")
    replies = b"+OK\r\n-ERR nope\r\n:-42\r\n$5\r\na\r\nb\0\r\n$-1\r\n*3\r\n$1\r\nx\r\n:1\r\n$-1\r\n*-1\r\n"
    for n in range(len(replies)):
        connection.dataReceived(replies[n:n + 1])
    results = []
    for command in commands:
        command.addBoth(results.append)
    assert results[0] == "OK" and results[2:] == [-42, b"a\r\nb\0", None, [b"x", 1, None], None]
    assert isinstance(results[1].value, StoreUnavailable) and "ERR nope" in str(results[1].value)
    assert connection.ended is None and not transport.disconnecting


@pytest.mark.parametrize("garbage", [b"+OK\r\n?what\r\n", b"+OK\r\n:not a number\r\n",
                                     b"+OK\r\n+OK\r\n+unasked\r\n"])
def test_a_reply_that_is_not_resp2_drops_the_connection(garbage):
    connection, transport = connection_with()
    first, second = connection.command(b"PING"), connection.command(b"PING")
    lost = []
    connection.on_lost = lost.append
    connection.dataReceived(garbage)
    assert lost and transport.disconnecting
    assert first.result == "OK"
    if garbage.count(b"+OK") == 2:  # both answered, then a reply nobody asked for
        assert second.result == "OK"
    else:
        assert isinstance(failure_of(second), StoreUnavailable)
