"""The OMDb adapter over real HTTP against a fake OMDb, and its dropin as Twisted's plugin system finds it."""

import json

import pytest
import pytest_twisted
import treq
import twisted.plugins
from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred
from twisted.plugin import getPlugins

from ambassador.adapter import IAdapterPlugin
from ambassador.testing import logged_events, serving, start_ambassador
from ambassador_omdb.adapter import OMDbPlugin
from ambassador_omdb.testing import FakeOMDb

KEY = "test-omdb-key"
SECRETS = (KEY, "wrong-omdb-key", "callers-omdb-key", "file-omdb-key")


@pytest.fixture(autouse=True)
def log_events():
    with logged_events(secrets=SECRETS) as events:
        yield events


@pytest.fixture
def fake_omdb():
    with serving(FakeOMDb()) as fake:
        yield fake


@pytest_twisted.async_yield_fixture
async def omdb(fake_omdb):
    """Start an ambassador serving OMDb (pointed at the fake) with ``settings``; returns its URL."""
    started = []

    def start(**settings):
        environ = {"OMDB_BASE_URL": fake_omdb.base_url, **settings}
        started.append(start_ambassador([OMDbPlugin().configure(environ, reactor)]))
        return started[-1].url

    yield start
    for ambassador in started:
        await maybeDeferred(ambassador.service.stopService)


async def get(url: str):
    response = await treq.get(url, persistent=False)
    return response, await response.content()


def problem(response, body, status: int, kind: str) -> dict:
    assert response.code == status
    assert response.headers.getRawHeaders("content-type") == ["application/problem+json"]
    document = json.loads(body)
    assert (document["status"], document["type"]) == (status, f"urn:ambassador:problem:{kind}")
    for secret in SECRETS:
        assert secret.encode() not in body
    return document


@pytest_twisted.ensureDeferred
async def test_success_is_passed_on_unchanged_with_the_key_added(fake_omdb, omdb):
    url = omdb(OMDB_API_KEY=KEY)
    response, body = await get(url + "/omdb?t=The+Matrix&plot=full&apikey=callers-omdb-key&r=xml&callback=f")
    direct, direct_body = await get(fake_omdb.base_url + f"/?t=The+Matrix&apikey={KEY}")
    assert response.code == 200
    assert body == direct_body and json.loads(body)["imdbID"] == "tt0133093"
    assert response.headers.getRawHeaders("content-type") == ["application/json; charset=utf-8"]
    assert response.headers.getRawHeaders("cache-control") == ["public, max-age=86400"]
    seen = fake_omdb.requests[0]
    assert (seen.path, seen.query) == ("/", (("t", "The Matrix"), ("plot", "full"), ("apikey", KEY)))


@pytest_twisted.ensureDeferred
async def test_every_documented_parameter_is_forwarded(fake_omdb, omdb):
    url = omdb(OMDB_API_KEY=KEY)
    response, body = await get(url + "/omdb?s=matrix&y=1999&type=movie&page=1")
    assert response.code == 200
    assert [m["Title"] for m in json.loads(body)["Search"]] == ["The Matrix", "The Matrix Reloaded"]
    response, body = await get(url + "/omdb?i=tt0903747")
    assert json.loads(body)["Title"] == "Breaking Bad"
    assert [r.query for r in fake_omdb.requests] == [
        (("s", "matrix"), ("y", "1999"), ("type", "movie"), ("page", "1"), ("apikey", KEY)),
        (("i", "tt0903747"), ("apikey", KEY)),
    ]


@pytest.mark.parametrize(
    "query, status, kind, detail",
    [
        ("t=Nothing+Like+It", 404, "not-found", "OMDb: Movie not found!"),
        ("t=Nothing+Like+It&type=series", 404, "not-found", "OMDb: Series not found!"),
        ("s=zzzzz", 404, "not-found", "OMDb: Movie not found!"),
        ("i=tt123", 400, "bad-request", "OMDb: Incorrect IMDb ID."),
        ("", 400, "bad-request", "OMDb: Incorrect IMDb ID."),
        ("s=ab", 400, "bad-request", "OMDb: Too many results."),
        ("s=matrix&page=0", 400, "bad-request", "may not be negative"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_omdb_errors_sent_as_200_get_honest_statuses(fake_omdb, omdb, query, status, kind, detail):
    url = omdb(OMDB_API_KEY=KEY)
    document = problem(*await get(url + "/omdb?" + query), status, kind)
    assert detail in document["detail"]
    assert len(fake_omdb.requests) == 1


@pytest_twisted.ensureDeferred
async def test_rejected_key_is_502_credential_rejected(fake_omdb, omdb):
    url = omdb(OMDB_API_KEY="wrong-omdb-key")
    document = problem(*await get(url + "/omdb?t=The+Matrix"), 502, "credential-rejected")
    assert "OMDb service rejected the credential" in document["detail"]


@pytest_twisted.ensureDeferred
async def test_used_up_quota_is_503_with_retry_after(fake_omdb, omdb):
    url = omdb(OMDB_API_KEY=KEY)
    fake_omdb.quota_used_up = True
    response, body = await get(url + "/omdb?t=The+Matrix")
    document = problem(response, body, 503, "upstream-quota-exhausted")
    assert "Request limit reached!" in document["detail"]
    assert response.headers.getRawHeaders("retry-after") == ["3600"]


@pytest_twisted.ensureDeferred
async def test_unknown_error_text_is_502_with_the_text(fake_omdb, omdb):
    url = omdb(OMDB_API_KEY=KEY)
    fake_omdb.error = f"Something new went wrong for {KEY}."
    document = problem(*await get(url + "/omdb?t=The+Matrix"), 502, "upstream-error")
    assert "Something new went wrong for [REDACTED]." in document["detail"]


@pytest_twisted.ensureDeferred
async def test_no_key_is_503_naming_the_variables(fake_omdb, omdb):
    document = problem(*await get(omdb() + "/omdb?t=The+Matrix"), 503, "credential-missing")
    assert "OMDB_API_KEY" in document["detail"]
    assert fake_omdb.requests == []


@pytest_twisted.ensureDeferred
async def test_key_from_a_secret_file(fake_omdb, omdb, tmp_path):
    fake_omdb.api_keys.add("file-omdb-key")
    (tmp_path / "apikey").write_text("file-omdb-key\n")
    response, _ = await get(omdb(OMDB_API_KEY_FILE=str(tmp_path / "apikey")) + "/omdb?t=The+Matrix")
    assert response.code == 200
    assert fake_omdb.requests[0].param("apikey") == "file-omdb-key"


def test_the_installed_dropin_registers_the_plugin_with_twisted():
    """What twistd ambassador finds (the ambassador's tests/test_plugins.py serves it under twistd)."""
    [plugin] = [plugin for plugin in getPlugins(IAdapterPlugin, twisted.plugins) if plugin.name == "omdb"]
    assert isinstance(plugin, OMDbPlugin)
    assert [(route.name, route.path) for route in plugin.routes] == [("omdb", "/omdb")]
    assert [(s.name, s.secret) for s in plugin.settings] == [
        ("OMDB_API_KEY", True), ("OMDB_API_KEY_FILE", False), ("OMDB_BASE_URL", False)]
