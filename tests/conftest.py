"""Shared fixtures: a fake TMDB and an ambassador, both real HTTP servers on loopback."""

from __future__ import annotations

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred
from twisted.logger import formatEvent, globalLogPublisher

from ambassador.adapters.tmdb import TMDBPlugin
from ambassador.service import assemble
from ambassador.testing import FakeTMDB, serve

# Every secret a test hands the ambassador; none may ever show up in a log event.
SECRETS = ("test-api-key", "test-read-token", "caller-own-key", "file-api-key", "rotated-api-key")


@pytest.fixture
def fake_tmdb():
    fake = FakeTMDB()
    port = serve(fake)
    fake.base_url = port.base_url
    yield fake
    for request in fake.hanging:
        if not request._disconnected:
            request.transport.abortConnection()
    port.stopListening()


@pytest.fixture(autouse=True)
def log_events():
    """Every log event emitted during the test; afterwards, checks none holds a secret."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)
    for event in events:
        text = f"{formatEvent(event)} {event!r}"
        if "log_failure" in event:
            text += event["log_failure"].getTraceback()
        for secret in SECRETS:
            assert secret not in text, f"secret {secret!r} leaked into a log event: {text}"


@pytest_twisted.async_yield_fixture
async def start_ambassador():
    """Start an ambassador serving the TMDB adapter configured from ``environ`` (keywords go to
    ``assemble``); returns the Ambassador with ``url`` and ``admin_url`` added."""
    services = []

    async def start(environ, *, plugin=TMDBPlugin(), **settings):
        settings.setdefault("grace_period", 0)  # teardown must not wait on a test's Clock
        ambassador = assemble(reactor, [plugin.configure(environ, reactor)], endpoint="tcp:0:interface=127.0.0.1",
                              admin_endpoint="tcp:0:interface=127.0.0.1", **settings)
        ambassador.service.privilegedStartService()
        ambassador.service.startService()
        services.append(ambassador.service)
        ambassador.url = f"http://127.0.0.1:{ambassador.proxy.port.getHost().port}"
        ambassador.admin_url = f"http://127.0.0.1:{ambassador.admin.port.getHost().port}"
        return ambassador

    yield start
    for service in services:
        await maybeDeferred(service.stopService)


def tmdb_env(fake, **settings):
    return {"TMDB_BASE_URL": fake.base_url, **settings}


async def get(url: str, *, method: str = "GET", headers=None):
    """One request over a fresh connection; returns (response, body bytes)."""
    response = await treq.request(method, url, headers=headers, persistent=False)
    return response, await response.content()


def header(response, name: str):
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None
