"""The Redis store of the shared cache against a real redis-server on loopback.

Round trips, TTLs, AUTH (default user and ACL user), SELECT, TLS, an outage
and a restart, a Redis that does not answer, and (a fake Redis written with
Twisted) one that answers what a Redis never would. Command timeouts and
reconnection waits run on the test's Clock; real time is only waited for
(with a deadline) where a real process acts.
"""

import datetime
import ipaddress
import math
import os
import subprocess
import sys
import time

import hiredis
import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate
from twisted.internet.task import Clock, deferLater
from twisted.logger import formatEvent

from ambassador.cache.redisstore import BACKOFF_FIRST, BACKOFF_MAX, ErrorReply, RedisStore, StoreUnavailable, parse_redis_url
from conftest import reactor_turns_until, tmdb_env

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
async def test_a_limited_get_reads_at_most_one_byte_past_the_limit(redis_server, open_store):
    store = await open_store(redis_server.url())
    await store.set(b"big", b"b" * 100_000, ttl=60)
    await store.set(b"small", b"s" * 10, ttl=60)
    assert await store.get(b"big", limit=1000) == b"b" * 1001  # longer than the limit, and no more crossed
    assert await store.get(b"small", limit=1000) == b"s" * 10
    assert await store.get(b"never set", limit=1000) is None
    await redis_server.cli("RPUSH", "a-list", "x")
    with pytest.raises(ErrorReply, match="WRONGTYPE"):
        await store.get(b"a-list", limit=1000)


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
    (f"rediss://alice:{PASSWORD}@cache:6380/1", "cache", 6380, 1, "alice", PASSWORD, "rediss://cache:6380/1"),
    ("rediss://cache", "cache", 6379, 0, None, None, "rediss://cache:6379/0"),
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
    assert address.tls == url.startswith("rediss://")
    assert RedisStore(url, reactor).description == description


@pytest.mark.parametrize("url, why", [
    (f"http://:{PASSWORD}@cache/0", "redis://"),
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
    assert why in message and "redis[s]://[[user]:password@]host[:port][/db]" in message
    assert PASSWORD not in message


@pytest_twisted.ensureDeferred
async def test_a_host_name_is_resolved(redis_server, open_store):
    store = await open_store(f"redis://localhost:{redis_server.port}/0")
    assert store.available and await store.get(b"k") is None


@pytest_twisted.ensureDeferred
async def test_a_wrong_acl_password_is_refused_and_shown_nowhere(start_redis, open_store, log_events):
    server = await start_redis(password=PASSWORD, users={"alice": "alice-redis-password"})
    changes = []
    store = await open_store(server.url(user="alice", password="wrong-redis-password"), on_change=changes.append)
    assert changes == [False] and not store.available
    [event] = events_about(log_events, store)
    assert "AUTH failed" in event and "WRONGPASS" in event
    # the right password of another user does not do either: AUTH names the user
    other = await open_store(server.url(user="alice", password=PASSWORD))
    assert not other.available
    # every logged event is checked for the passwords (conftest's SECRETS) when the test ends


def test_importing_the_store_installs_no_reactor():
    """twistd (or a test) chooses the reactor after importing the ambassador; txredisapi would install
    the default one when imported."""
    code = ("import sys, ambassador.cache.redisstore, ambassador.app.service; "
            "print('twisted.internet.reactor' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


# TLS: a throwaway CA, and certificates it (or nobody) signed, for redis-server's --tls-port.

def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key, issuer: str, issuer_key, *, ca: bool, names=()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def tls_files(tmp_path):
    """``tls_files(names)``: (certificate file, key file, the CA's PEM) of a server certificate for
    ``names`` (x509 general names) signed by a CA made for this test."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("ambassador test CA", ca_key, "ambassador test CA", ca_key, ca=True)

    def make(names, *, signed_by_ca: bool = True) -> tuple[str, str, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        if signed_by_ca:
            certificate = _certificate("redis", key, "ambassador test CA", ca_key, ca=False, names=names)
        else:  # signed by itself
            certificate = _certificate("redis", key, "redis", key, ca=False, names=names)
        directory = tmp_path / f"tls-{len(list(tmp_path.glob('tls-*')))}"
        directory.mkdir()
        (directory / "redis.crt").write_bytes(_pem(certificate))
        (directory / "redis.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        return str(directory / "redis.crt"), str(directory / "redis.key"), _pem(ca)

    return make


LOOPBACK = (x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost"))


@pytest_twisted.ensureDeferred
async def test_rediss_speaks_tls_verified_against_the_trust_root(start_redis, open_store, tls_files, log_events):
    certificate, key, ca = tls_files(LOOPBACK)
    server = await start_redis(password=PASSWORD, users={"alice": "alice-redis-password"}, tls=(certificate, key))
    url = server.url(user="alice", password="alice-redis-password")
    assert url.startswith("rediss://")
    store = await open_store(url, trust_root=Certificate.loadPEM(ca))
    assert store.available and store.description == f"rediss://127.0.0.1:{server.port}/0"
    value = os.urandom(64 * 1024)
    await store.set(b"k", value, ttl=60)
    assert await store.get(b"k") == value
    assert await server.cli("STRLEN", "k") == b"65536\n"
    by_name = await open_store(f"rediss://alice:alice-redis-password@localhost:{server.port}/0",
                               trust_root=Certificate.loadPEM(ca))
    assert await by_name.get(b"k") == value
    assert events_about(log_events, store)[0] == f"Redis cache {store.description} is connected"


@pytest_twisted.ensureDeferred
async def test_rediss_trusts_the_ca_file_the_upstreams_do(start_redis, tls_files, start_ambassador, fake_tmdb,
                                                          log_events):
    certificate, key, ca = tls_files(LOOPBACK)
    server = await start_redis(password=PASSWORD, tls=(certificate, key))
    for trusted, connected in (((), False), ((Certificate.loadPEM(ca),), True)):  # without and with --ca-file
        before = len(log_events)
        ambassador = await start_ambassador(tmdb_env(fake_tmdb, TMDB_API_KEY="test-api-key"),
                                            cache_url=server.url(password=PASSWORD), ca_certificates=trusted)
        store = ambassador.wiring.cache_store
        await reactor_turns_until(lambda: events_about(log_events[before:], store))  # the first outcome, logged
        assert store.available is connected


@pytest.mark.parametrize("signed_by_ca, names, trusted, said", [
    (True, LOOPBACK, False, "certificate verify failed"),  # our CA is not in the system's trust store
    (False, LOOPBACK, True, "certificate verify failed"),  # signed by itself, not by the trusted CA
    (True, [x509.DNSName("redis.example")], True, "does not match"),  # signed, but for another host
])
@pytest_twisted.ensureDeferred
async def test_rediss_refuses_a_certificate_it_cannot_trust(start_redis, open_store, tls_files, log_events,
                                                          signed_by_ca, names, trusted, said):
    certificate, key, ca = tls_files(names, signed_by_ca=signed_by_ca)
    server = await start_redis(password=PASSWORD, tls=(certificate, key))
    changes = []
    store = await open_store(server.url(), on_change=changes.append,
                             **({"trust_root": Certificate.loadPEM(ca)} if trusted else {}))
    assert changes == [False] and not store.available
    [event] = events_about(log_events, store)
    assert "is unreachable" in event and "TLS" in event and said in event, event
    assert isinstance(failure_of(store.get(b"k")), StoreUnavailable)


# A fake Redis, for what a real one never sends.

class FakeRedis(Protocol):
    """Reads commands (hiredis parses them) and answers each with ``answers[name]``, default ``+PONG``;
    an answer that is a list is written a byte per reactor turn."""

    def __init__(self, answers: dict[bytes, bytes | list[bytes]]) -> None:
        self.answers, self.reader = answers, hiredis.Reader()

    def dataReceived(self, data: bytes) -> None:
        self.reader.feed(data)
        while (command := self.reader.gets()) is not False:
            answer = self.answers.get(command[0].upper(), b"+PONG\r\n")
            if isinstance(answer, list):
                self.dribble(answer)
            else:
                self.transport.write(answer)

    def dribble(self, pieces: list[bytes]) -> None:
        if pieces:
            self.transport.write(pieces[0])
            reactor.callLater(0, self.dribble, pieces[1:])


@pytest_twisted.async_yield_fixture
async def fake_redis():
    """``await fake_redis(answers)``: the URL of a FakeRedis on loopback."""
    ports = []

    async def start(answers) -> str:
        ports.append(await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(lambda: FakeRedis(answers))))
        return f"redis://127.0.0.1:{ports[-1].getHost().port}/0"

    yield start
    for port in ports:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_reply_split_anywhere_is_read_whole(fake_redis, open_store):
    reply = b"$11\r\na\r\nb\0$-1\r\n+\r\n"  # a bulk string that looks like RESP inside
    store = await open_store(await fake_redis({b"GET": [reply[n:n + 1] for n in range(len(reply))]}))
    assert await store.get(b"k") == b"a\r\nb\0$-1\r\n+" and store.available


@pytest.mark.parametrize("answer, said", [
    (b"?what\r\n", "not RESP"),
    (b"$1\r\nv\r\n+unasked\r\n", "a reply nobody asked for"),
])
@pytest_twisted.ensureDeferred
async def test_what_a_redis_never_sends_drops_the_connection(fake_redis, open_store, clock, log_events,
                                                             answer, said):
    changes = []
    store = await open_store(await fake_redis({b"GET": answer}), on_change=changes.append)
    got = await store.get(b"k").addErrback(lambda failure: failure.value)
    if said == "not RESP":
        assert isinstance(got, StoreUnavailable) and said in str(got)
    else:  # the reply that was asked for still goes to its command
        assert got == b"v"
    await turns_until(lambda: not store.available)  # the unasked reply is nobody's
    assert changes == [True, False]
    assert said in events_about(log_events, store)[-1]
    clock.advance(BACKOFF_FIRST)
    await turns_until(lambda: store.available)
