"""The proxy port's HTTP/1.1 over loopback (a twisted.web Site): keep-alive, pipelining, HEAD,
100-continue, HTTP/1.0, a caller leaving (499) and the drain on shutdown.

The limits and refusals are in test_limits.py, the targets in test_no_ssrf.py.
"""

import pytest_twisted

from conftest import connect_raw, parse_response, reactor_turns_until, tmdb_env

KEY = {"TMDB_API_KEY": "test-api-key"}


def responses(raw: bytes) -> list[tuple[int, dict, bytes]]:
    """Every response in ``raw`` (none to a HEAD), in order."""
    found = []
    while raw:
        status, headers, body = parse_response(raw)
        raw = raw[raw.index(b"\r\n\r\n") + 4 + int(headers.get("content-length", 0)):]
        assert raw == b"" or raw.startswith(b"HTTP/1."), raw[:40]
        found.append((status, headers, body))
    return found


def get(path: str, request_id: str, extra: bytes = b"", method: bytes = b"GET") -> bytes:
    return (method + b" " + path.encode() + b" HTTP/1.1\r\nHost: localhost\r\nX-Request-ID: "
            + request_id.encode() + b"\r\n" + extra + b"\r\n")


@pytest_twisted.ensureDeferred
async def test_pipelined_requests_on_one_kept_alive_connection_are_answered_in_order(fake_tmdb, start_ambassador):
    url = (await start_ambassador(tmdb_env(fake_tmdb, **KEY), cache_bytes=None)).url
    client = await connect_raw(url)
    client.transport.write(b"".join(get(f"/tmdb/3/movie/550?n={n}", f"r{n}") for n in range(3))
                           + get("/tmdb/3/movie/550?n=3", "r3", b"Connection: close\r\n"))
    answers = responses(await client.closed)
    assert [(status, headers["x-request-id"]) for status, headers, _ in answers] == [
        (200, "r0"), (200, "r1"), (200, "r2"), (200, "r3")]
    assert [h.get("connection") for _, h, _ in answers] == [None, None, None, "close"]
    assert [r.param("n") for r in fake_tmdb.requests] == ["0", "1", "2", "3"]


@pytest_twisted.ensureDeferred
async def test_a_head_answer_has_the_length_but_no_body(fake_tmdb, start_ambassador):
    url = (await start_ambassador(tmdb_env(fake_tmdb, **KEY))).url
    client = await connect_raw(url)
    client.transport.write(get("/tmdb/3/movie/550", "h", method=b"HEAD")
                           + get("/tmdb/3/movie/550", "g", b"Connection: close\r\n"))
    raw = await client.closed
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"x-request-id: h" in head.lower()
    length = int(parse_response(raw)[1]["content-length"])
    assert length > 0 and rest.startswith(b"HTTP/1.1 200 ")  # the GET's answer follows the HEAD's head at once
    status, headers, body = parse_response(rest)
    assert headers["x-request-id"] == "g" and len(body) == length


@pytest_twisted.ensureDeferred
async def test_100_continue_is_sent_before_the_body_is_read(fake_tmdb, start_ambassador):
    url = (await start_ambassador(tmdb_env(fake_tmdb, **KEY))).url
    client = await connect_raw(url)
    client.transport.write(get("/tmdb/3/movie/550", "c", b"Content-Length: 2\r\nExpect: 100-continue\r\n"
                                                         b"Connection: close\r\n", method=b"POST"))
    await reactor_turns_until(lambda: client.received)
    assert client.received == b"HTTP/1.1 100 Continue\r\n\r\n"
    client.transport.write(b"{}")
    status, headers, _ = parse_response(await client.closed)
    assert (status, headers["allow"]) == (405, "GET, HEAD")
    assert fake_tmdb.requests == []


@pytest_twisted.ensureDeferred
async def test_an_http_1_0_request_is_answered_and_the_connection_closed(fake_tmdb, start_ambassador):
    url = (await start_ambassador(tmdb_env(fake_tmdb, **KEY))).url
    client = await connect_raw(url)
    client.transport.write(b"GET /tmdb/3/movie/550 HTTP/1.0\r\n\r\n")
    status, headers, body = parse_response(await client.closed)
    assert status == 200 and len(body) == int(headers["content-length"]) > 0


@pytest_twisted.ensureDeferred
async def test_an_http_1_0_connection_is_kept_when_the_caller_asks(fake_tmdb, start_ambassador):
    url = (await start_ambassador(tmdb_env(fake_tmdb, **KEY))).url
    client = await connect_raw(url)
    client.transport.write(b"GET /tmdb/3/movie/550 HTTP/1.0\r\nConnection: Keep-Alive\r\nX-Request-ID: k\r\n\r\n"
                           b"GET /tmdb/3/movie/550 HTTP/1.0\r\nX-Request-ID: c\r\n\r\n")
    answers = responses(await client.closed)
    assert [(s, h["x-request-id"], h.get("connection")) for s, h, _ in answers] == [
        (200, "k", "keep-alive"), (200, "c", None)]


@pytest_twisted.ensureDeferred
async def test_a_caller_leaving_before_the_answer_is_logged_as_499_and_the_upstream_call_dropped(
        fake_tmdb, start_ambassador, log_events):
    url = (await start_ambassador(tmdb_env(fake_tmdb, **KEY))).url
    fake_tmdb.fault = "hang"
    client = await connect_raw(url)
    client.transport.write(get("/tmdb/3/movie/550", "gone"))
    await reactor_turns_until(lambda: fake_tmdb.hanging)
    client.transport.loseConnection()
    await reactor_turns_until(lambda: not fake_tmdb.connected(fake_tmdb.hanging[0]))
    access = [e for e in log_events if e.get("log_namespace") == "ambassador.access"]
    assert [(e["status"], e["request_id"]) for e in access] == [(499, "gone")]


@pytest_twisted.ensureDeferred
async def test_a_shutdown_closes_idle_connections_and_answers_busy_ones_with_connection_close(
        fake_tmdb, start_ambassador):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, **KEY), grace_period=30)
    fake_tmdb.fault = "hang"
    busy, idle = await connect_raw(ambassador.url), await connect_raw(ambassador.url)
    busy.transport.write(get("/tmdb/3/movie/550", "busy"))
    await reactor_turns_until(lambda: fake_tmdb.hanging)
    stopped = ambassador.service.stopService()
    assert await idle.closed == b""
    assert not busy.closed.called
    fake_tmdb.release()
    status, headers, _ = parse_response(await busy.closed)
    assert (status, headers["connection"], headers["x-request-id"]) == (200, "close", "busy")
    await stopped


@pytest_twisted.ensureDeferred
async def test_lines_may_end_in_a_bare_lf_and_empty_lines_before_a_request_are_ignored(fake_tmdb, start_ambassador):
    url = (await start_ambassador(tmdb_env(fake_tmdb, **KEY))).url
    client = await connect_raw(url)
    client.transport.write(b"\r\n\nGET /tmdb/3/movie/550 HTTP/1.1\nHost: a\nX-Request-ID: lf\r\nConnection: close\n\n")
    status, headers, _ = parse_response(await client.closed)
    assert (status, headers["x-request-id"]) == (200, "lf")
