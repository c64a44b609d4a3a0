"""Bounded inbound resources: request line, headers, body, read deadline, idle timeout, connections.

Sizes go over real TCP; timeouts drive the proxy Site with a Clock over Twisted's StringTransport.
"""

import json

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from ambassador.web.limits import InboundLimits
from ambassador.metrics import Metrics
from ambassador.web.proxy import ProxyFactory
from conftest import connect_raw, parse_response, raw_exchange, tmdb_env
from test_no_ssrf import assert_problem, still_serves

KEY = {"TMDB_API_KEY": "test-api-key"}
LIMITS = InboundLimits()
REQUEST = b"GET /tmdb/3/movie/550 HTTP/1.1\r\nHost: localhost\r\n"
CHUNKED = REQUEST + b"Transfer-Encoding: chunked\r\n\r\n"


def refusals(log_events):
    return [e for e in log_events if e.get("log_namespace") == "ambassador.access" and "Refused" in e["log_format"]]


@pytest.mark.parametrize(
    "data, status, kind",
    [
        (b"GET /" + b"a" * LIMITS.max_line + b" HTTP/1.1\r\n\r\n", 414, "target-too-long"),
        (b"GET /" + b"a" * (LIMITS.max_line * 4), 414, "target-too-long"),  # no line end at all
        (REQUEST + b"X-Big: " + b"a" * LIMITS.max_line + b"\r\n\r\n", 431, "headers-too-large"),
        (REQUEST + b"".join(b"X-%d: 1\r\n" % i for i in range(LIMITS.max_headers)) + b"\r\n", 431,
         "headers-too-large"),
        (REQUEST + b"".join(b"X-%d: %s\r\n" % (i, b"a" * 4000) for i in range(9)) + b"\r\n", 431,
         "headers-too-large"),
        (REQUEST + b"Content-Length: %d\r\n\r\n" % (LIMITS.max_body + 1), 413, "body-too-large"),
        (REQUEST + b"Content-Length: 99999999999999999999\r\n\r\n", 413, "body-too-large"),
        (REQUEST + b"Transfer-Encoding: chunked\r\n\r\n" + (b"4000\r\n" + b"a" * 0x4000 + b"\r\n") * 5, 413,
         "body-too-large"),
        (REQUEST + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\n12345", 400, "bad-request"),
        (REQUEST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n12345", 400, "bad-request"),
        (REQUEST + b"Content-Length: -1\r\n\r\n", 400, "bad-request"),
        (REQUEST + b"Transfer-Encoding: gzip\r\n\r\n", 400, "bad-request"),
        (b"POST /tmdb/3/movie/550 HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "bad-request"),
        (REQUEST + b"Host: other\r\n\r\n", 400, "bad-request"),
        (b"GET /tmdb/3/movie/550 HTTP/1.1 extra\r\n\r\n", 400, "bad-request"),
        (b"GET /tmdb/3/movie/550 HTTP/2.0\r\n\r\n", 400, "bad-request"),
        (REQUEST + b"No colon here\r\n\r\n", 400, "bad-request"),
        (REQUEST + b"Bad Name: 1\r\n\r\n", 400, "bad-request"),
        (REQUEST + b"X-Nul: a\x00b\r\n\r\n", 400, "bad-request"),
        (REQUEST + b"X-Bare-Cr: a\rb\r\n\r\n", 400, "bad-request"),
        # A malformed chunked body: Twisted's decoder would answer a bare 400 (LimitedChannel.rawDataReceived).
        (CHUNKED + b"zz\r\n", 400, "bad-request"),  # a size that is not hex
        (CHUNKED + b"2\r\nabc\r\n0\r\n\r\n", 400, "bad-request"),  # a chunk longer than its size
        (CHUNKED + b"1;a=\x01\r\na\r\n0\r\n\r\n", 400, "bad-request"),  # a control byte in an extension
        (CHUNKED + b"1" * 2000 + b"\r\n", 400, "bad-request"),  # a size line beyond Twisted's 1 KiB
        # Framing and trailers are bounded by bytes (max_body_framing): tiny chunks, long extensions or trailers.
        (CHUNKED + b"1\r\na\r\n" * 7000, 413, "body-too-large"),
        (CHUNKED + (b"1;" + b"x" * 900 + b"\r\na\r\n") * 6, 413, "body-too-large"),
        (CHUNKED + b"1\r\na\r\n0\r\n" + b"X-Trailer: %s\r\n" % (b"t" * 1000) * 5, 413, "body-too-large"),
        (b"GET /tmdb/3/movie/550 HTTP/1.1\r\nX-No-Host: 1\r\n\r\n", 400, "missing-host"),  # RFC 9112 3.2
    ],
)
@pytest_twisted.ensureDeferred
async def test_oversized_or_malformed_requests_get_a_problem_and_nothing_goes_upstream(
    fake_tmdb, start_ambassador, log_events, data, status, kind
):
    url = (await start_ambassador(tmdb_env(fake_tmdb, **KEY))).url
    status_seen, headers, body = await raw_exchange(url, data)
    assert_problem(status_seen, headers, body, status, kind)
    assert headers["connection"] == "close"
    assert fake_tmdb.requests == []
    assert [(e["status"], e["problem"], e["request_id"]) for e in refusals(log_events)] == [
        (status, kind, headers["x-request-id"])]
    assert json.loads(body)["request_id"] == headers["x-request-id"]
    await still_serves(url, fake_tmdb)


@pytest_twisted.ensureDeferred
async def test_the_admin_listener_keeps_to_the_same_limits(fake_tmdb, start_ambassador):
    admin_url = (await start_ambassador(tmdb_env(fake_tmdb, **KEY))).admin_url
    many = b"GET /healthz HTTP/1.1\r\n" + b"X-Many: 1\r\n" * (LIMITS.max_headers + 1) + b"\r\n"
    assert_problem(*await raw_exchange(admin_url, many), 431, "headers-too-large")
    status, headers, body = await raw_exchange(admin_url, b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert (status, body) == (200, b"ok\n") and "server" not in headers


@pytest_twisted.ensureDeferred
async def test_requests_within_the_limits_are_served(fake_tmdb, start_ambassador):
    url = (await start_ambassador(tmdb_env(fake_tmdb, **KEY), cache_bytes=None)).url  # each one goes upstream
    headers = b"".join(b"X-%d: %s\r\n" % (i, b"a" * 250) for i in range(LIMITS.max_headers - 3))
    body = b"a" * LIMITS.max_body
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    # The whole body in 256-byte chunks, with two trailers: its framing is well within max_body_framing.
    small_chunks = b"".join(b"100\r\n" + body[i:i + 256] + b"\r\n" for i in range(0, len(body), 256))
    small_chunks += b"0\r\nX-Checksum: 1\r\nX-Note: %s\r\n\r\n" % (b"n" * 1000)
    for data in (REQUEST + headers + b"Connection: close\r\n\r\n",
                 REQUEST + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body,
                 REQUEST + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked,
                 REQUEST + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + small_chunks):
        status, _, _ = await raw_exchange(url, data)
        assert status == 200
    assert len(fake_tmdb.requests) == 4


@pytest_twisted.ensureDeferred
async def test_connections_beyond_the_limit_get_503_and_serving_goes_on(fake_tmdb, start_ambassador, log_events):
    url = (await start_ambassador(tmdb_env(fake_tmdb, **KEY), limits=InboundLimits(max_connections=2))).url
    first, second = await connect_raw(url), await connect_raw(url)
    third = await connect_raw(url)
    status, headers, body = parse_response(await third.closed)
    document = assert_problem(status, headers, body, 503, "too-many-connections")
    assert headers["retry-after"] == "1" and "at most 2 connections" in document["detail"]
    first.transport.write(REQUEST + b"Connection: close\r\n\r\n")
    assert parse_response(await first.closed)[0] == 200
    await still_serves(url, fake_tmdb)  # the first one's place is free again
    second.transport.loseConnection()
    assert [e["status"] for e in refusals(log_events)] == [503]


class HalfClosableTransport(StringTransport):
    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


def proxy_channel(clock, **limits):
    """A proxy connection (the real factory and parser, no routes) on a StringTransport, timed by ``clock``."""
    site = ProxyFactory([], None, Metrics(), clock, limits=InboundLimits(**limits))
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    transport = HalfClosableTransport()
    channel.makeConnection(transport)
    return channel, transport


def test_a_request_trickled_byte_by_byte_gets_408_after_the_read_timeout():
    clock = Clock()
    channel, transport = proxy_channel(clock, read_timeout=10, idle_timeout=60)
    trickle = b"GET /movies HTTP/1.1\r\nX-Slow: "  # a byte every 0.3 s never lets the idle timeout fire
    for byte in trickle:
        channel.dataReceived(bytes([byte]))
        clock.advance(0.3)
    assert clock.seconds() < 10 and transport.value() == b""
    clock.advance(9.99 - clock.seconds())
    assert not transport.write_closed
    clock.advance(0.01)
    status, _, body = parse_response(transport.value())
    assert status == 408 and json.loads(body)["type"] == "urn:ambassador:problem:request-timeout"
    assert transport.write_closed and not transport.disconnecting
    channel.dataReceived(b"more " * 1000)  # read and dropped while lingering
    assert parse_response(transport.value())[0] == 408 and len(transport.value()) < 500
    clock.advance(10)
    assert transport.disconnected  # a caller that never closes is cut off


def test_a_caller_sending_only_empty_lines_gets_408_after_the_read_timeout():
    """Empty lines may come before a request (RFC 9112 section 2.2): they start the deadline all the same."""
    clock = Clock()
    channel, transport = proxy_channel(clock, read_timeout=10, idle_timeout=60)
    for _ in range(3):
        channel.dataReceived(b"\r\n")
        clock.advance(3)
    assert transport.value() == b""
    clock.advance(1)
    assert parse_response(transport.value())[0] == 408 and transport.write_closed


def test_a_silent_connection_is_closed_after_the_idle_timeout():
    clock = Clock()
    channel, transport = proxy_channel(clock, read_timeout=10, idle_timeout=60)
    clock.advance(59)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting and transport.value() == b""


def test_the_read_timeout_stops_when_the_request_is_complete_and_restarts_with_the_next():
    clock = Clock()
    channel, transport = proxy_channel(clock, read_timeout=10, idle_timeout=60)
    channel.dataReceived(b"GET /nowhere HTTP/1.1\r\nHost: a\r\n\r\n")
    assert parse_response(transport.value())[0] == 404
    transport.clear()
    clock.advance(30)  # idle between requests: only the idle timeout applies
    assert not transport.disconnecting
    channel.dataReceived(b"GET /nowhere HTTP/1.1\r\nHost: a\r\n")
    clock.advance(10)
    assert parse_response(transport.value())[0] == 408 and transport.write_closed
