"""Hostile input, round two (issue 21): each test holds one item of docs/security.md, over real HTTP."""

from __future__ import annotations

import pytest_twisted

from ambassador.credentials.sources import FileSecret
from conftest import connect_raw, parse_response, tmdb_env
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
