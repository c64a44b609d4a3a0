"""Property tests: whatever bytes a caller sends, the answer is a forwarded request for an allowed
upstream path (with only the ambassador's headers and credential) or a 4xx problem+json; never a 5xx,
never the credential; and the ambassador keeps serving.

Each example is one raw request over a new loopback connection to one long-lived ambassador.
"""

import re

import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ambassador.pipeline.resilience import Policy
from ambassador.web.limits import InboundLimits
from conftest import connect_raw, parse_response, tmdb_env
from test_no_ssrf import UPSTREAM_HEADERS, still_serves

KEY = "test-api-key"
ALLOWED_PATH = re.compile(r"/3/[A-Za-z0-9_.,:~-]+(/[A-Za-z0-9_.,:~-]+)*\Z")
FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))

TRICKY = [b"/", b"//", b"\\", b".", b"..", b"%2e", b"%2E%2e", b"%2f", b"%252f", b"%5c", b"%00", b"\x00", b"\r\n",
          b"\r", b"\n", b" ", b"\t", b"%", b"%c0%ae", b"\xc0\xae", b"\xef\xbc\x8e", b"%ef%bc%8f", b"\xe2\x80\xae",
          b"@", b"evil.example", b"127.0.0.1", b":", b"http:", b"https://", b"?", b"#", b"&", b"=", b";", b"*",
          b"~", b"tmdb", b"3", b"movie", b"550", b"movies", b"api_key", b"API_KEY", b"api%5Fkey", b"%3f", b"%23",
          b"+", b"HTTP/1.1", b"a" * 300]
PREFIXES = [b"", b"/", b"/tmdb/3/", b"/tmdb/3/movie/", b"/movies", b"/movies?", b"/tmdb/3/search/movie?",
            b"http://evil.example/", b"//evil.example/", b"*"]


def pieces(extra=()):
    return st.lists(st.sampled_from(TRICKY + list(extra)) | st.binary(max_size=3), max_size=10).map(b"".join)


targets = st.one_of(st.builds(bytes.__add__, st.sampled_from(PREFIXES), pieces()), st.binary(min_size=1, max_size=40))
queries = st.builds(bytes.__add__, st.sampled_from([b"/movies?", b"/tmdb/3/search/movie?"]),
                    pieces([b"page=1", b"api_key=caller-value", b"&api_key=", b"%ff", b"%0d%0a", b"query=x"]))
header_names = st.sampled_from([b"Authorization", b"Cookie", b"Host", b"Proxy-Authorization", b"Proxy-Connection",
                                b"Connection", b"Keep-Alive", b"TE", b"Upgrade", b"Forwarded", b"X-Forwarded-For",
                                b"X-Forwarded-Host", b"X-Real-IP", b"X-Request-ID", b"Expect", b"Cookie2",
                                b"Set-Cookie", b"X-Custom"]) | st.from_regex(rb"\A[A-Za-z0-9!#$%&'*+.^_`|~-]{1,20}\Z")
header_values = pieces([b"Bearer caller-value", b"close", b"evil.example", b"\r\nHost: evil.example",
                        b"\r\nSet-Cookie: x=1", b"100-continue", b"h2c"])
methods = st.sampled_from([b"GET", b"HEAD", b"POST", b"CONNECT", b"OPTIONS", b"get", b"TRACE", b"GE\x00T"])


def check(fake, raw: bytes, forwarded) -> None:
    """The property, for one exchange: ``raw`` is all the ambassador sent back."""
    assert KEY.encode() not in raw
    assert not re.search(rb"HTTP/1\.1 5\d\d ", raw), raw[:300]
    for seen in forwarded:
        assert seen.method == "GET"
        assert ALLOWED_PATH.match(seen.path) and not {".", ".."} & set(seen.path.split("/")), seen.path
        assert set(seen.headers) <= UPSTREAM_HEADERS, seen.headers
        assert seen.headers["host"] == fake.base_url.split("://")[1]
        assert [v for k, v in seen.query if k.lower() == "api_key"] == [KEY]
    if not forwarded:
        status, headers, _ = parse_response(raw)
        assert 400 <= status < 500 and headers["content-type"] == "application/problem+json", raw[:300]


async def exchange(url: str, fake, data: bytes) -> None:
    before = len(fake.requests)
    client = await connect_raw(url)
    client.transport.write(data)
    raw = await client.closed
    check(fake, raw, fake.requests[before:])


@pytest_twisted.async_yield_fixture
async def ambassador(fake_tmdb, start_ambassador):
    """One ambassador for all examples of a test; afterwards it must still serve."""
    # Short timeouts: a fuzzed Content-Length can leave the ambassador waiting for a body (it answers 408).
    # No cache: every example's upstream request is what is checked.
    # No rate limit: the examples come far faster than TMDB's 40 a second, and a 429 is not what they check.
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, TMDB_API_KEY=KEY), cache_bytes=None,
                                        limits=InboundLimits(read_timeout=0.5, idle_timeout=0.5),
                                        policies={"tmdb": Policy()})
    yield ambassador
    await still_serves(ambassador.url, fake_tmdb)


@settings(FUZZ, max_examples=1500)
@given(method=methods, target=targets)
@pytest_twisted.ensureDeferred
async def test_any_request_target(ambassador, fake_tmdb, method, target):
    await exchange(ambassador.url, fake_tmdb,
                   method + b" " + target + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")


@settings(FUZZ, max_examples=800)
@given(target=queries)
@pytest_twisted.ensureDeferred
async def test_any_query_string(ambassador, fake_tmdb, target):
    await exchange(ambassador.url, fake_tmdb, b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")


@settings(FUZZ, max_examples=800)
@given(headers=st.lists(st.tuples(header_names, header_values), max_size=8))
@pytest_twisted.ensureDeferred
async def test_any_headers(ambassador, fake_tmdb, headers):
    lines = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    # Twisted reads only the first Connection header: this one, so the ambassador closes after answering.
    await exchange(ambassador.url, fake_tmdb,
                   b"GET /tmdb/3/movie/550 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n" + lines + b"\r\n")
