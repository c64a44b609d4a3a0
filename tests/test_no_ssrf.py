"""The ambassador cannot be turned against its own credentials: only the configured upstream, only
allowed paths, no caller header upstream, no upstream header or redirect back, no injection.

Request targets are sent as raw bytes over TCP: an HTTP client would normalise most of them.
"""

import json
import uuid
from functools import partial
from urllib.parse import parse_qsl

import pytest
import pytest_twisted
from attrs import asdict, evolve
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from ambassador.adapters.tmdb import TMDBAdapter, TMDBPlugin
from ambassador.pipeline.answers import PASSED_RESPONSE_HEADERS, forward
from ambassador.credentials.sources import FILE_POLL_INTERVAL, FileSecret
from ambassador.exchange import UpstreamResponse
from ambassador.testing import FakeTMDB, serve
from ambassador.web.proxy import _form_pairs
from conftest import get, header, raw_exchange, tmdb_env

KEY = {"TMDB_API_KEY": "test-api-key"}
# What the ambassador itself sends upstream; nothing the caller sent may add to it.
UPSTREAM_HEADERS = {"host", "user-agent", "connection", "accept-encoding"}


def assert_problem(status, headers, body, expected_status, kind):
    assert status == expected_status, body
    assert headers["content-type"] == "application/problem+json"
    document = json.loads(body)
    assert (document["status"], document["type"]) == (expected_status, f"urn:ambassador:problem:{kind}")
    assert b"test-api-key" not in body
    return document


async def still_serves(url, fake):
    before = len(fake.requests)
    response, _ = await get(url + f"/tmdb/3/movie/550?nonce={uuid.uuid4().hex}")  # never a cache hit
    assert response.code == 200
    assert [r.path for r in fake.requests[before:]] == ["/3/movie/550"]


@pytest.mark.parametrize(
    "line, status, kind",
    [
        (b"GET http://evil.example/3/movie/550 HTTP/1.1", 400, "bad-target"),
        (b"GET http://{upstream}/3/movie/550 HTTP/1.1", 400, "bad-target"),  # even the upstream itself
        (b"GET https://evil.example:443/movies HTTP/1.1", 400, "bad-target"),
        (b"CONNECT evil.example:443 HTTP/1.1", 400, "bad-target"),
        (b"CONNECT {upstream} HTTP/1.1", 400, "bad-target"),
        (b"OPTIONS * HTTP/1.1", 400, "bad-target"),
        (b"GET //evil.example/3/movie/550 HTTP/1.1", 400, "bad-target"),
        (b"GET tmdb/3/movie/550 HTTP/1.1", 400, "bad-target"),
        (b"GET /tmdb/3/../../evil HTTP/1.1", 400, "bad-path"),
        (b"GET /tmdb/3/movie/../../../4/x HTTP/1.1", 400, "bad-path"),
        (b"GET /tmdb/3/%2e%2e/%2e%2e/x HTTP/1.1", 400, "bad-path"),
        (b"GET /tmdb/3/%2E%2E HTTP/1.1", 400, "bad-path"),
        (b"GET /tmdb/3/./movie/550 HTTP/1.1", 400, "bad-path"),
        (b"GET /tmdb/3/movie%2f550 HTTP/1.1", 400, "bad-path"),
        (b"GET /tmdb/3/movie%252f550 HTTP/1.1", 400, "bad-path"),
        (b"GET /tmdb/3/movie\\..\\..\\550 HTTP/1.1", 400, "bad-path"),
        (b"GET /tmdb/3/..\\evil HTTP/1.1", 400, "bad-path"),
        (b"GET /tmdb/3//evil.example/x HTTP/1.1", 400, "bad-path"),
        (b"GET /tmdb//3/movie/550 HTTP/1.1", 400, "bad-path"),
        (b"GET /tmdb/3/@evil.example/x HTTP/1.1", 400, "bad-path"),
        (b"GET /tmdb/3/movie/550@evil.example HTTP/1.1", 400, "bad-path"),
        (b"GET /tmdb/3/movie/550%00 HTTP/1.1", 400, "bad-path"),
        (b"GET /tmdb/3/movie/550%0d%0aX-Injected:%201 HTTP/1.1", 400, "bad-path"),
        (b"GET /tmdb/3/movie/550\x00 HTTP/1.1", 400, "bad-request"),
        (b"GET /tmdb/3/movie/5\x0150 HTTP/1.1", 400, "bad-request"),
        (b"GET /tmdb/3/movie/550\x7f HTTP/1.1", 400, "bad-request"),
        (b"GET /tmdb/3/movie/550#@evil.example HTTP/1.1", 400, "bad-path"),
        (b"GET /tmdb/3/movie/\xef\xbc\x8e\xef\xbc\x8e HTTP/1.1", 400, "bad-request"),  # fullwidth dots, raw
        (b"GET /tmdb/3/movie/%EF%BC%8E%EF%BC%8E HTTP/1.1", 400, "bad-path"),  # fullwidth dots, encoded
        (b"GET /tmdb/3/movie/\xc0\xae\xc0\xae HTTP/1.1", 400, "bad-request"),  # overlong UTF-8 dots
        (b"GET /tmdb/3/movie/%C0%AE%C0%AE HTTP/1.1", 400, "bad-path"),
        (b"GET /tmdb/3/movie/\x80 HTTP/1.1", 400, "bad-request"),  # a target is ASCII
        (b"GET /tm%64b/3/movie/550 HTTP/1.1", 400, "bad-path"),
        (b"GET /tmdb/3 HTTP/1.1", 404, "not-found"),
        (b"GET /tmdb/4/movie/550 HTTP/1.1", 404, "not-found"),
        (b"GET /tmdb/movie/550 HTTP/1.1", 404, "not-found"),
        (b"GET /movies/../tmdb/3/movie/550 HTTP/1.1", 400, "bad-path"),
        (b"GET /tmdb/3/" + b"a" * 9000 + b" HTTP/1.1", 414, "target-too-long"),
        (b"GET /movies?" + b"a=b&" * 3000 + b" HTTP/1.1", 414, "target-too-long"),
        (b"GET /movies HTTP/2.0", 400, "bad-request"),
        (b"GET  /movies HTTP/1.1", 400, "bad-request"),
        (b"G\xc9T /movies HTTP/1.1", 400, "bad-request"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_request_targets_outside_the_allowlist_never_leave(fake_tmdb, start_ambassador, line, status, kind):
    url = (await start_ambassador(tmdb_env(fake_tmdb, **KEY))).url
    line = line.replace(b"{upstream}", fake_tmdb.base_url.split("://")[1].encode())
    answer = await raw_exchange(url, line + b"\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert_problem(*answer, status, kind)
    assert fake_tmdb.requests == []
    await still_serves(url, fake_tmdb)


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE", b"PATCH", b"TRACE", b"OPTIONS", b"get"])
@pytest_twisted.ensureDeferred
async def test_only_get_and_head_reach_the_upstream(fake_tmdb, start_ambassador, method):
    url = (await start_ambassador(tmdb_env(fake_tmdb, **KEY))).url
    answer = await raw_exchange(url, method + b" /tmdb/3/movie/550 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert_problem(*answer, 405, "method-not-allowed")
    assert fake_tmdb.requests == []


@pytest_twisted.ensureDeferred
async def test_duplicate_and_malformed_query_parameters(fake_tmdb, start_ambassador):
    url = (await start_ambassador(tmdb_env(fake_tmdb, **KEY))).url
    query = b"page=1&page=2&api_key=a&API_KEY=b&Api_Key=c&api%5Fkey=d&&=e&f&g=%zz&h=1;i=2&j=%E2%80%AE"
    status, _, _ = await raw_exchange(url, b"GET /movies?" + query + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert status == 200
    [seen] = fake_tmdb.requests
    assert seen.path == "/3/discover/movie"
    assert seen.query == (("page", "1"), ("page", "2"), ("", "e"), ("f", ""), ("g", "%zz"), ("h", "1;i=2"),
                          ("j", "\u202e"), ("api_key", "test-api-key"))


@given(query=st.text(st.sampled_from("ab=&;%+\xe9\x00"), max_size=16))
def test_a_query_reads_as_parse_qsl_reads_it(query):
    """web._form_pairs, parse_qsl at C speed for a query without escapes, says the same, or fails the same."""
    for errors in ("strict", "replace"):
        read = []
        for parse in (partial(parse_qsl, keep_blank_values=True, errors=errors), partial(_form_pairs, errors=errors)):
            try:
                read.append(parse(query))
            except UnicodeDecodeError:
                read.append("not UTF-8")
        assert read[0] == read[1]


@pytest.mark.parametrize("query", [b"q=%00", b"q=%0d%0aX:1", b"q%09=1", b"q=%ff", b"q=%c0%ae"])
@pytest_twisted.ensureDeferred
async def test_queries_with_control_characters_or_not_utf8_are_400(fake_tmdb, start_ambassador, query):
    url = (await start_ambassador(tmdb_env(fake_tmdb, **KEY))).url
    answer = await raw_exchange(url, b"GET /movies?" + query + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert_problem(*answer, 400, "bad-query")
    assert fake_tmdb.requests == []


CALLER_HEADERS = (
    b"Host: evil.example\r\n"
    b"Authorization: Bearer caller-own-key\r\n"
    b"Cookie: session=caller-own-key\r\n"
    b"Proxy-Authorization: Basic caller-own-key\r\n"
    b"Proxy-Connection: keep-alive\r\n"
    b"Forwarded: for=10.0.0.1;host=evil.example\r\n"
    b"X-Forwarded-For: 10.0.0.1\r\n"
    b"X-Forwarded-Host: evil.example\r\n"
    b"X-Forwarded-Proto: https\r\n"
    b"X-Real-IP: 10.0.0.1\r\n"
    b"Connection: X-Named-Hop, close\r\n"
    b"X-Named-Hop: 1\r\n"
    b"Keep-Alive: timeout=5\r\n"
    b"TE: trailers\r\n"
    b"Upgrade: h2c\r\n"
    b"X-Custom: kept\r\n"
)


class CarelessTMDB(TMDBAdapter):
    """An adapter that copies every header it is given into the upstream request."""

    def upstream_request(self, inbound):
        return evolve(super().upstream_request(inbound), headers=dict(inbound.headers))


class CarelessPlugin(TMDBPlugin):
    def configure(self, environ, reactor):
        return CarelessTMDB(**asdict(super().configure(environ, reactor), recurse=False))


@pytest_twisted.ensureDeferred
async def test_no_caller_header_is_sent_upstream(fake_tmdb, start_ambassador):
    url = (await start_ambassador(tmdb_env(fake_tmdb, **KEY))).url
    request = b"GET /tmdb/3/movie/550 HTTP/1.1\r\n" + CALLER_HEADERS + b"\r\n"
    status, _, _ = await raw_exchange(url, request)
    assert status == 200
    [seen] = fake_tmdb.requests
    assert set(seen.headers) <= UPSTREAM_HEADERS
    assert seen.headers["host"] == fake_tmdb.base_url.split("://")[1]


@pytest_twisted.ensureDeferred
async def test_upstream_cookies_are_never_sent_back_with_a_later_request(fake_tmdb, start_ambassador):
    url = (await start_ambassador(tmdb_env(fake_tmdb, **KEY), cache_bytes=None)).url  # both must go upstream
    for _ in range(2):
        response, _ = await get(url + "/tmdb/3/movie/550")  # the fake answers Set-Cookie: tmdb.session=abc
        assert response.code == 200
    assert [set(seen.headers) <= UPSTREAM_HEADERS for seen in fake_tmdb.requests] == [True, True]


@pytest_twisted.ensureDeferred
async def test_even_a_careless_adapter_never_sees_credential_forwarding_or_hop_headers(fake_tmdb, start_ambassador):
    url = (await start_ambassador(tmdb_env(fake_tmdb, **KEY), plugin=CarelessPlugin())).url
    status, _, _ = await raw_exchange(url, b"GET /tmdb/3/movie/550 HTTP/1.1\r\n" + CALLER_HEADERS + b"\r\n")
    assert status == 200
    [seen] = fake_tmdb.requests
    assert set(seen.headers) == UPSTREAM_HEADERS & set(seen.headers) | {"x-custom"}
    assert seen.headers["x-custom"] == "kept"  # the adapter did copy what it was given
    assert seen.headers["host"] == fake_tmdb.base_url.split("://")[1]


@pytest_twisted.ensureDeferred
async def test_hop_by_hop_and_cookies_from_upstream_stay_behind(fake_tmdb, start_ambassador):
    url = (await start_ambassador(tmdb_env(fake_tmdb, **KEY))).url
    fake_tmdb.canned = (200, {"Content-Type": "application/json", "Set-Cookie": "s=1", "Keep-Alive": "timeout=5",
                              "Upgrade": "h2c", "Trailer": "X-T", "Proxy-Connection": "close", "Server": "openresty",
                              "Cache-Control": "max-age=5"}, b"{}")
    response, body = await get(url + "/tmdb/3/movie/550")
    assert (response.code, body) == (200, b"{}")
    for name in ("set-cookie", "keep-alive", "upgrade", "trailer", "proxy-connection", "server"):
        assert header(response, name) is None, name
    assert header(response, "cache-control") == "max-age=5"


def test_an_adapter_opts_in_to_set_cookie_but_never_to_hop_by_hop_headers():
    response = UpstreamResponse(200, {"set-cookie": "s=1", "connection": "x-hop", "x-hop": "1", "upgrade": "h2c",
                                      "content-type": "application/json"}, b"{}")
    names = PASSED_RESPONSE_HEADERS | {"set-cookie", "x-hop", "connection", "upgrade"}
    assert dict(forward(response, names).headers) == {"set-cookie": "s=1", "content-type": "application/json"}
    assert dict(forward(response).headers) == {"content-type": "application/json"}


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest_twisted.ensureDeferred
async def test_redirects_are_neither_followed_nor_passed_on(fake_tmdb, start_ambassador, status):
    elsewhere = FakeTMDB()
    port = serve(elsewhere)
    try:
        url = (await start_ambassador(tmdb_env(fake_tmdb, **KEY))).url
        location = f"{port.base_url}/3/movie/550?api_key=test-api-key"
        fake_tmdb.canned = (status, {"Location": location, "Content-Type": "application/json"}, b"{}")
        response, body = await get(url + "/tmdb/3/movie/550")
        assert_problem(response.code, {"content-type": header(response, "content-type")}, body, 502,
                       "upstream-bad-answer")
        assert header(response, "location") is None
        assert elsewhere.requests == []
        assert len(fake_tmdb.requests) == 1
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_crlf_in_a_credential_cannot_inject_headers_or_parameters(fake_tmdb, start_ambassador, tmp_path):
    (tmp_path / "token").write_text("test-read-token\r\nX-Injected: 1")
    url = (await start_ambassador(tmdb_env(fake_tmdb, TMDB_READ_ACCESS_TOKEN_FILE=str(tmp_path / "token")))).url
    response, body = await get(url + "/movies")  # a file holding a line break is not one value: refused
    assert response.code == 503 and b"holds control characters" in body
    assert fake_tmdb.requests == []

    url = (await start_ambassador(tmdb_env(fake_tmdb, TMDB_API_KEY="test-api-key&page=9\r\nX-Injected: 1"))).url
    await get(url + "/movies")
    seen = fake_tmdb.requests[-1]
    assert seen.query == (("api_key", "test-api-key&page=9\r\nX-Injected: 1"),)
    assert "x-injected" not in seen.headers


class SmallTMDB(TMDBAdapter):
    max_response_bytes = 1000


class SmallPlugin(TMDBPlugin):
    def configure(self, environ, reactor):
        return SmallTMDB(**asdict(super().configure(environ, reactor), recurse=False))


@pytest.mark.parametrize("plugin, limit", [(TMDBPlugin(), 10 * 1024 * 1024), (SmallPlugin(), 1000)])
@pytest_twisted.ensureDeferred
async def test_upstream_answers_beyond_the_adapters_limit_are_502(fake_tmdb, start_ambassador, plugin, limit):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, **KEY), plugin=plugin)
    fake_tmdb.canned = (200, {"Content-Type": "application/json"}, b"[" + b" " * (limit - 2) + b"]")
    response, body = await get(ambassador.url + "/tmdb/3/movie/550")
    assert (response.code, len(body)) == (200, limit)
    fake_tmdb.canned = (200, {"Content-Type": "application/json"}, b"[" + b" " * (limit - 1) + b"]")
    response, body = await get(ambassador.url + "/tmdb/3/movie/550")
    document = assert_problem(response.code, {"content-type": header(response, "content-type")}, body, 502,
                              "upstream-too-large")
    assert f"more than {limit} bytes" in document["detail"]
    assert b'outcome="too-large"' in ambassador.metrics.exposition()
    fake_tmdb.canned = None
    await still_serves(ambassador.url, fake_tmdb)


@pytest_twisted.ensureDeferred
async def test_required_token_is_checked_rotated_and_never_forwarded(fake_tmdb, start_ambassador, tmp_path):
    (tmp_path / "token").write_text("caller-token\n")
    clock = Clock()
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, **KEY), token=FileSecret(str(tmp_path / "token")),
                                        clock=clock)
    for offered in (None, "Bearer wrong", "Bearer caller-token-and-more", "caller-token", "Basic caller-token"):
        response, body = await get(ambassador.url + "/movies",
                                   headers={"Authorization": offered} if offered else None)
        assert_problem(response.code, {"content-type": header(response, "content-type")}, body, 401, "unauthorized")
        assert header(response, "www-authenticate") == "Bearer"
    assert fake_tmdb.requests == []
    response, _ = await get(ambassador.url + "/movies", headers={"Authorization": "Bearer caller-token"})
    assert response.code == 200
    [seen] = fake_tmdb.requests
    assert "authorization" not in seen.headers

    (tmp_path / "token").write_text("rotated-token\n")
    clock.advance(FILE_POLL_INTERVAL)
    response, _ = await get(ambassador.url + "/movies", headers={"Authorization": "Bearer caller-token"})
    assert response.code == 401
    response, _ = await get(ambassador.url + "/movies", headers={"Authorization": "Bearer rotated-token"})
    assert response.code == 200

    for path in ("/readyz", "/upstreams", "/metrics", "/healthz"):
        _, body = await get(ambassador.admin_url + path)
        assert b"caller-token" not in body and b"rotated-token" not in body and b"test-api-key" not in body
