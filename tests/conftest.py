"""Shared fixtures: a fake TMDB and an ambassador, both real HTTP servers on loopback."""

from __future__ import annotations

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred

from ambassador.adapters.tmdb import TMDBPlugin
from ambassador.testing import FakeTMDB, logged_events, serving
from ambassador.testing import start_ambassador as serve_adapters

# Every secret a test hands the ambassador; none may ever show up in a log event.
SECRETS = ("test-api-key", "test-read-token", "caller-own-key", "file-api-key", "rotated-api-key",
           "test-weather-key")


@pytest.fixture
def fake_tmdb():
    with serving(FakeTMDB()) as fake:
        yield fake
        for request in fake.hanging:
            if not request._disconnected:
                request.transport.abortConnection()


@pytest.fixture(autouse=True)
def log_events():
    """Every log event emitted during the test; afterwards, checks none holds a secret."""
    with logged_events(secrets=SECRETS) as events:
        yield events


@pytest_twisted.async_yield_fixture
async def start_ambassador():
    """Start an ambassador serving the TMDB adapter configured from ``environ`` (keywords go to
    ``assemble``); returns the Ambassador with ``url`` and ``admin_url`` added."""
    services = []

    async def start(environ, *, plugin=TMDBPlugin(), **settings):
        settings.setdefault("grace_period", 0)  # teardown must not wait on a test's Clock
        ambassador = serve_adapters([plugin.configure(environ, reactor)], **settings)
        services.append(ambassador.service)
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
