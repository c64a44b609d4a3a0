"""The TMDB routes over real HTTP: paths, parameters and credentials reach the fake TMDB as they should."""

import json

import pytest_twisted

from conftest import get, header, tmdb_env


@pytest_twisted.ensureDeferred
async def test_movies_is_discover_with_the_api_key_added(fake_tmdb, start_ambassador):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, TMDB_API_KEY="test-api-key"))
    url = ambassador.url
    response, body = await get(url + "/movies")
    assert response.code == 200
    assert header(response, "content-type") == "application/json;charset=utf-8"
    assert [m["title"] for m in json.loads(body)["results"]][0] == "The Matrix"
    [seen] = fake_tmdb.requests
    assert (seen.method, seen.path, seen.query) == ("GET", "/3/discover/movie", (("api_key", "test-api-key"),))


@pytest_twisted.ensureDeferred
async def test_movies_passes_the_callers_parameters(fake_tmdb, start_ambassador):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, TMDB_API_KEY="test-api-key"))
    url = ambassador.url
    response, body = await get(url + "/movies?page=1&sort_by=vote_count.desc&with_genres=18%2C53")
    assert response.code == 200
    assert json.loads(body)["results"][0]["title"] == "Fight Club"
    [seen] = fake_tmdb.requests
    assert seen.query == (("page", "1"), ("sort_by", "vote_count.desc"), ("with_genres", "18,53"),
                          ("api_key", "test-api-key"))


@pytest_twisted.ensureDeferred
async def test_passthrough_serves_any_v3_read_path(fake_tmdb, start_ambassador):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, TMDB_API_KEY="test-api-key"))
    url = ambassador.url
    response, body = await get(url + "/tmdb/3/movie/550")
    assert response.code == 200
    assert json.loads(body)["title"] == "Fight Club"
    response, body = await get(url + "/tmdb/3/search/movie?query=matrix")
    assert [m["id"] for m in json.loads(body)["results"]] == [603]
    assert [r.path for r in fake_tmdb.requests] == ["/3/movie/550", "/3/search/movie"]
    assert fake_tmdb.requests[1].query == (("query", "matrix"), ("api_key", "test-api-key"))


@pytest_twisted.ensureDeferred
async def test_head_answers_headers_without_body(fake_tmdb, start_ambassador):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, TMDB_API_KEY="test-api-key"))
    url = ambassador.url
    response, body = await get(url + "/movies", method="HEAD")
    assert response.code == 200
    assert body == b""
    assert int(header(response, "content-length")) > 100
    assert header(response, "content-type").startswith("application/json")


@pytest_twisted.ensureDeferred
async def test_callers_credentials_are_replaced(fake_tmdb, start_ambassador):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, TMDB_API_KEY="test-api-key"))
    url = ambassador.url
    response, _ = await get(url + "/tmdb/3/movie/550?api_key=caller-own-key&API_KEY=caller-own-key",
                            headers={"Authorization": "Bearer caller-own-key", "Cookie": "a=b"})
    assert response.code == 200
    [seen] = fake_tmdb.requests
    assert seen.query == (("api_key", "test-api-key"),)
    assert "authorization" not in seen.headers and "cookie" not in seen.headers


@pytest_twisted.ensureDeferred
async def test_read_access_token_is_sent_as_bearer_and_preferred(fake_tmdb, start_ambassador):
    ambassador = await start_ambassador(
        tmdb_env(fake_tmdb, TMDB_API_KEY="test-api-key", TMDB_READ_ACCESS_TOKEN="test-read-token")
    )
    url = ambassador.url
    response, _ = await get(url + "/movies?api_key=caller-own-key")
    assert response.code == 200
    [seen] = fake_tmdb.requests
    assert seen.headers["authorization"] == "Bearer test-read-token"
    assert seen.query == ()


@pytest_twisted.ensureDeferred
async def test_api_key_variable_from_the_original_article(fake_tmdb, start_ambassador):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, API_KEY="test-api-key"))
    url = ambassador.url
    response, _ = await get(url + "/movies")
    assert response.code == 200
    assert fake_tmdb.requests[0].param("api_key") == "test-api-key"


@pytest_twisted.ensureDeferred
async def test_tmdb_api_key_wins_over_api_key(fake_tmdb, start_ambassador):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, TMDB_API_KEY="test-api-key", API_KEY="caller-own-key"))
    url = ambassador.url
    await get(url + "/movies")
    assert fake_tmdb.requests[0].param("api_key") == "test-api-key"


@pytest_twisted.ensureDeferred
async def test_credentials_from_secret_files(fake_tmdb, start_ambassador, tmp_path):
    fake_tmdb.api_keys.add("file-api-key")
    (tmp_path / "apikey").write_text("  file-api-key\n")
    (tmp_path / "token").write_text("test-read-token\n")
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, TMDB_API_KEY_FILE=str(tmp_path / "apikey")))
    url = ambassador.url
    response, _ = await get(url + "/movies")
    assert response.code == 200
    assert fake_tmdb.requests[-1].param("api_key") == "file-api-key"

    ambassador = await start_ambassador(tmdb_env(fake_tmdb, TMDB_READ_ACCESS_TOKEN_FILE=str(tmp_path / "token")))
    url = ambassador.url
    response, _ = await get(url + "/movies")
    assert response.code == 200
    assert fake_tmdb.requests[-1].headers["authorization"] == "Bearer test-read-token"


@pytest_twisted.ensureDeferred
async def test_only_descriptive_upstream_headers_come_back(fake_tmdb, start_ambassador):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, TMDB_API_KEY="test-api-key"))
    url = ambassador.url
    response, _ = await get(url + "/tmdb/3/movie/550")
    assert header(response, "cache-control") == "public, max-age=21600"
    assert header(response, "set-cookie") is None
    assert header(response, "server") != "openresty"


@pytest_twisted.ensureDeferred
async def test_access_log_has_one_redacted_event_per_request(fake_tmdb, start_ambassador, log_events):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, TMDB_API_KEY="test-api-key"))
    url = ambassador.url
    await get(url + "/movies?api_key=caller-own-key&page=1")
    [event] = [e for e in log_events if e.get("log_namespace") == "ambassador.access"]
    assert event["path"] == "/movies?api_key=[REDACTED]&page=1"
    assert (event["method"], event["status"], event["adapter"], event["route"]) == ("GET", 200, "tmdb", "movies")
    assert event["duration_ms"] >= 0
