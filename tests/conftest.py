"""Shared fixtures: a fake TMDB and an ambassador, both real HTTP servers on loopback."""

from __future__ import annotations

import time

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, deferLater

from ambassador.adapters.tmdb import TMDBPlugin
from ambassador.app.configfile import adapters_from_file
from ambassador.app.discovery import discover_adapters
from ambassador.testing import FakeTMDB, logged_events, serve, serving
from ambassador.testing import start_ambassador as serve_adapters
from redis_server import RedisServer

# Every secret a test hands the ambassador; none may ever show up in a log event.
SECRETS = ("test-api-key", "test-read-token", "caller-own-key", "file-api-key", "rotated-api-key",
           "test-weather-key", "caller-token", "rotated-token",
           # credentials.py styles and OAuth2 (base64 of "reader:basic-password" too)
           "query-secret", "header-secret", "bearer-secret", "rotated-bearer-secret", "basic-password",
           "cmVhZGVyOmJhc2ljLXBhc3N3b3Jk", "test-client-secret", "test-access-token",
           # the Redis cache's passwords (redisstore.py)
           "test-redis-password", "wrong-redis-password", "alice-redis-password")


@pytest.fixture
def clock():
    clock = Clock()
    clock.advance(1_800_000_000)  # a realistic epoch, for HTTP dates (Retry-After, Expires)
    return clock


@pytest.fixture
def fake_tmdb():
    with serving(FakeTMDB(), gzip=True) as fake:  # as TMDB: gzip when asked (the adapter asks)
        yield fake
        for request in fake.hanging:
            if not request._disconnected:
                request.transport.abortConnection()


@pytest.fixture
def serve_fake():
    """``serve_fake(resource)`` serves a fake on loopback for this test and returns its base URL."""
    ports = []

    def start(resource) -> str:
        ports.append(serve(resource))
        return ports[-1].base_url

    yield start
    for port in ports:
        port.stopListening()


def adapters_from_yaml(tmp_path, text: str, environ=None) -> list:
    """The adapters a config file with ``text`` configures."""
    path = tmp_path / "ambassador.yaml"
    path.write_text(text)
    return adapters_from_file(str(path), environ or {}, discover_adapters().adapters, reactor)


@pytest.fixture(autouse=True)
def log_events():
    """Every log event emitted during the test; afterwards, checks none holds a secret."""
    with logged_events(secrets=SECRETS) as events:
        yield events


@pytest_twisted.async_yield_fixture
async def start_ambassador():
    """Start an ambassador serving the TMDB adapter configured from ``environ``, or ``adapters``
    (other keywords are Settings fields, or clock, rng, peers); returns the Ambassador with ``url``
    and ``admin_url`` added."""
    services = []

    async def start(environ=None, *, plugin=TMDBPlugin(), adapters=None, **settings):
        settings.setdefault("grace_period", 0)  # teardown must not wait on a test's Clock
        if adapters is None:
            adapters = [plugin.configure(environ, reactor)]
        ambassador = serve_adapters(adapters, **settings)
        services.append(ambassador.service)
        return ambassador

    yield start
    for service in services:
        if service.running:  # a test may have stopped it already
            await maybeDeferred(service.stopService)


@pytest_twisted.async_yield_fixture
async def start_redis(tmp_path):
    """``await start_redis(password=..., users=...)`` runs a real redis-server (see ``RedisServer``)
    on a free loopback port for this test; each is stopped afterwards."""
    servers = []

    async def start(**options) -> RedisServer:
        directory = tmp_path / f"redis-{len(servers)}"
        directory.mkdir()
        servers.append(RedisServer(directory, **options))
        await servers[-1].start()
        return servers[-1]

    yield start
    for server in servers:
        await server.stop()


@pytest_twisted.async_yield_fixture
async def redis_server(start_redis):
    """A real redis-server without a password, for this test."""
    yield await start_redis()


def tmdb_env(fake, **settings):
    return {"TMDB_BASE_URL": fake.base_url, **settings}


async def get(url: str, *, method: str = "GET", headers=None):
    """One request over a fresh connection; returns (response, body bytes)."""
    response = await treq.request(method, url, headers=headers, persistent=False)
    return response, await response.content()


async def reactor_turns_until(condition, give_up_after=10.0):
    """Let the reactor run (no time passes on a test's Clock) until ``condition()`` holds:
    loopback I/O in flight gets done. Gives up after ``give_up_after`` real seconds."""
    give_up = time.monotonic() + give_up_after
    while not condition():
        if time.monotonic() > give_up:
            raise AssertionError("condition never held")
        await deferLater(reactor, 0, lambda: None)


def header(response, name: str):
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None


class RawClient(Protocol):
    """Sends bytes as they are (no HTTP client normalises them); ``closed`` fires with all it received."""

    def __init__(self) -> None:
        self.received = b""
        self.closed = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.closed.callback(self.received)


async def connect_raw(url: str) -> RawClient:
    client = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", int(url.rsplit(":", 1)[1])), client)
    return client


async def raw_exchange(url: str, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` over a new connection, read until the server closes; the first response's
    (status, headers with lower-case names, body)."""
    client = await connect_raw(url)
    client.transport.write(data)
    return parse_response(await client.closed)


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """The first final response in ``raw`` (after any 100 Continue)."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    if head.startswith(b"HTTP/1.1 100 "):
        return parse_response(rest)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", len(rest)))
    return int(status_line.split(" ")[1]), headers, rest[:length]
