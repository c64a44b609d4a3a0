"""Shared fixtures: a fake TMDB and an ambassador, both real HTTP servers on loopback."""

from __future__ import annotations

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred
from twisted.logger import formatEvent, globalLogPublisher

from ambassador.adapters.tmdb import TMDBPlugin
from ambassador.configfile import adapters_from_file
from ambassador.discovery import discover_adapters
from ambassador.service import assemble
from ambassador.testing import FakeTMDB, serve

# Every secret a test hands the ambassador; none may ever show up in a log event.
SECRETS = ("test-api-key", "test-read-token", "caller-own-key", "file-api-key", "rotated-api-key",
           # credentials.py styles and OAuth2 (base64 of "reader:basic-password" too)
           "query-secret", "header-secret", "bearer-secret", "rotated-bearer-secret", "basic-password",
           "cmVhZGVyOmJhc2ljLXBhc3N3b3Jk", "test-client-secret", "test-access-token")


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
    return adapters_from_file(str(path), environ or {}, discover_adapters(), reactor)


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
    """Start an ambassador serving the TMDB adapter configured from ``environ``, or ``adapters``
    (other keywords go to ``assemble``); returns the Ambassador with ``url`` and ``admin_url`` added."""
    services = []

    async def start(environ=None, *, plugin=TMDBPlugin(), adapters=None, **settings):
        if adapters is None:
            adapters = [plugin.configure(environ, reactor)]
        ambassador = assemble(reactor, adapters, endpoint="tcp:0:interface=127.0.0.1",
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
