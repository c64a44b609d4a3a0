"""Hostile input, round two (issue 21): each test holds one item of docs/security.md, over real HTTP."""

from __future__ import annotations

import pytest_twisted

from ambassador.credentials.sources import FileSecret
from ambassador.testing import FakeAPI
from conftest import adapters_from_yaml, connect_raw, get, parse_response, tmdb_env
from test_no_ssrf import assert_problem

KEY = {"TMDB_API_KEY": "test-api-key"}


@pytest_twisted.ensureDeferred
async def test_without_the_token_a_request_is_refused_before_its_body_is_read(fake_tmdb, start_ambassador, tmp_path):
    (tmp_path / "token").write_text("caller-token\n")
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, **KEY), token=FileSecret(str(tmp_path / "token")))
    for framing in (b"Content-Length: 60000\r\n", b"Transfer-Encoding: chunked\r\n"):
        client = await connect_raw(ambassador.url)
        # Only the head: the answer comes without the body's ever being sent.
        client.transport.write(b"POST /movies HTTP/1.1\r\nHost: localhost\r\n" + framing + b"\r\n")
        status, headers, body = parse_response(await client.closed)
        assert_problem(status, headers, body, 401, "unauthorized")
        assert headers["www-authenticate"] == "Bearer" and headers["connection"] == "close"
    assert fake_tmdb.requests == []
    client = await connect_raw(ambassador.url)
    client.transport.write(b"GET /movies HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer caller-token\r\n"
                           b"Connection: close\r\n\r\n")
    assert parse_response(await client.closed)[0] == 200


# Parameters that merely resemble the credential's: any case, spaces, punctuation, brackets, fullwidth forms.
LOOKALIKES = ("API_KEY", "api_key%20%20", "%20api_key", "api.key", "api-key", "api_key[]", "api_key%5B0%5D",
              "Api%20Key", "apikey", "%EF%BD%81pi_key")


@pytest_twisted.ensureDeferred
async def test_tmdb_drops_every_parameter_resembling_its_credential(fake_tmdb, start_ambassador, log_events):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, **KEY), cache_bytes=None)
    query = "&".join(f"{name}=caller-own-key" for name in LOOKALIKES) + "&page=2&api_keys_of=x"
    for path in ("/tmdb/3/movie/550?", "/movies?"):
        response, _ = await get(ambassador.url + path + query)
        assert response.code == 200
    for sent in fake_tmdb.requests:
        assert [(k, v) for k, v in sent.query if k != "page"] == [("api_keys_of", "x"), ("api_key", "test-api-key")]
        assert "caller-own-key" not in repr(sent)
    # the access log redacts them too (conftest.log_events checks every event for the caller's key)


@pytest_twisted.ensureDeferred
async def test_the_http_adapter_drops_every_parameter_resembling_its_credential(serve_fake, start_ambassador, tmp_path):
    fake = FakeAPI(accept=lambda r: r.param("api_key") == "query-secret")
    config = (f"adapters:\n  api:\n    mount: /api\n    base_url: {serve_fake(fake)}\n"
              "    credential: {style: query, param: api_key, secret: {env: QUERY_KEY}}\n")
    ambassador = await start_ambassador(adapters=adapters_from_yaml(tmp_path, config, {"QUERY_KEY": "query-secret"}))
    response, _ = await get(ambassador.url + "/api/x?" + "&".join(f"{n}=caller-own-key" for n in LOOKALIKES) + "&q=1")
    assert response.code == 200
    [sent] = fake.requests
    assert list(sent.query) == [("q", "1"), ("api_key", "query-secret")]
