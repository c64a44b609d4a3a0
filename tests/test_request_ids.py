"""Request ids: taken from the caller or made, returned everywhere, logged, forwarded only when asked."""

import json
import re

import pytest
import pytest_twisted

from conftest import get, header, tmdb_env

KEY = {"TMDB_API_KEY": "test-api-key"}


def access_events(log_events):
    return [e for e in log_events if e.get("log_namespace") == "ambassador.access"]


@pytest_twisted.ensureDeferred
async def test_an_id_is_made_returned_and_logged(fake_tmdb, start_ambassador, log_events):
    url = (await start_ambassador(tmdb_env(fake_tmdb, **KEY))).url
    response, _ = await get(url + "/movies")
    request_id = header(response, "x-request-id")
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    [event] = access_events(log_events)
    assert event["request_id"] == request_id
    assert (event["upstream_status"], event["attempts"]) == (200, 1)
    assert "x-request-id" not in fake_tmdb.requests[0].headers  # not forwarded by default


@pytest_twisted.ensureDeferred
async def test_the_callers_id_is_kept_and_in_problem_bodies(fake_tmdb, start_ambassador, log_events):
    url = (await start_ambassador(tmdb_env(fake_tmdb))).url  # no credential: a 503 problem
    response, body = await get(url + "/movies", headers={"X-Request-ID": "caller-id-42"})
    assert header(response, "x-request-id") == "caller-id-42"
    assert json.loads(body)["request_id"] == "caller-id-42"
    assert access_events(log_events)[0]["request_id"] == "caller-id-42"
    response, body = await get(url + "/unknown", headers={"X-Request-ID": "caller-id-43"})
    assert json.loads(body)["request_id"] == "caller-id-43"


@pytest.mark.parametrize("offered", ["has space", "x" * 129, "new\\nline", "ünïcode"])
@pytest_twisted.ensureDeferred
async def test_unsafe_ids_are_replaced(fake_tmdb, start_ambassador, offered):
    url = (await start_ambassador(tmdb_env(fake_tmdb, **KEY))).url
    response, _ = await get(url + "/movies", headers={"X-Request-ID": offered.encode("utf-8")})
    assert re.fullmatch(r"[0-9a-f]{32}", header(response, "x-request-id"))


@pytest_twisted.ensureDeferred
async def test_forwarding_upstream_when_configured(fake_tmdb, start_ambassador):
    url = (await start_ambassador(tmdb_env(fake_tmdb, **KEY), forward_request_id={"tmdb"})).url
    await get(url + "/movies", headers={"X-Request-ID": "caller-id-44"})
    assert fake_tmdb.requests[0].headers["x-request-id"] == "caller-id-44"
