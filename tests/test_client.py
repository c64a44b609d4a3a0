"""The lean upstream client (ambassador.pipeline.http1client): framing, size cap, connection reuse, stale
connections, cancellation, idle expiry.

Network behaviour is tested over loopback against scripted Twisted servers; how an answer is
parsed when it arrives in pieces is tested by feeding a connection byte by byte.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from ambassador.pipeline.http1client import ConnectionPool, Origin, ResponseTooLarge, _Connection, _Exchange, request_head
from ambassador.exchange import UpstreamRequest
from ambassador.pipeline.client import UpstreamClient
from conftest import reactor_turns_until

GET = UpstreamRequest("GET", "/3/movie/550", (("api_key", "k"), ("q", "a b&c")))
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class _Scripted(Protocol):
    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            self.factory.requests.append((head, self))
            answer = self.factory.answers.pop(0) if self.factory.answers else self.factory.default
            if callable(answer):
                answer(self)
            elif answer is not None:
                self.transport.write(answer)

    def connectionLost(self, reason) -> None:
        self.factory.closed.append(self)
        for waiting in self.factory.waiting_for_close:
            if not waiting.called:
                waiting.callback(None)
        self.factory.waiting_for_close = []


class ScriptedServer(Factory):
    """Answers each request with the next of ``answers`` (bytes to write, a callable taking the
    protocol, or None to hold), then with ``default``."""

    protocol = _Scripted
    noisy = False

    def __init__(self, *answers, default=OK) -> None:
        self.answers = list(answers)
        self.default = default
        self.requests: list = []
        self.connections: list = []
        self.closed: list = []
        self.waiting_for_close: list = []

    def a_close(self) -> defer.Deferred:
        waiting = defer.Deferred()
        self.waiting_for_close.append(waiting)
        return waiting


@pytest.fixture
def server():
    ports = []

    def start(*answers, **kwargs):
        factory = ScriptedServer(*answers, **kwargs)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        ports.append((port, factory))
        factory.url = f"http://127.0.0.1:{port.getHost().port}"
        return factory

    yield start
    for port, factory in ports:
        for connection in factory.connections:
            connection.transport.abortConnection()
        port.stopListening()


@pytest_twisted.async_yield_fixture
async def pool():
    pools = []

    def make(**kwargs):
        pools.append(ConnectionPool(reactor, user_agent="ambassador-test", **kwargs))
        return pools[-1]

    yield make
    for made in pools:
        await made.close()


def close_after(answer: bytes):
    def act(protocol):
        protocol.transport.write(answer)
        protocol.transport.loseConnection()
    return act


def drop(protocol):
    protocol.transport.abortConnection()


@pytest_twisted.ensureDeferred
async def test_content_length_answer_and_the_request_sent(server, pool):
    upstream = server(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n"
                      b"X-Twice: a\r\nx-twice: b\r\nSet-Cookie: s=1\r\n\r\n{\"id\": 550}\n!")
    response = await pool().request(upstream.url, GET, 1000)
    assert response.status == 200
    assert response.body == b'{"id": 550}\n!'
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-twice"] == "a, b"
    head, _ = upstream.requests[0]
    lines = head.split(b"\r\n")
    assert lines[0] == b"GET /3/movie/550?api_key=k&q=a+b%26c HTTP/1.1"
    port = upstream.url.rsplit(":", 1)[1]
    assert sorted(lines[1:]) == [f"Host: 127.0.0.1:{port}".encode(), b"User-Agent: ambassador-test"]


@pytest_twisted.ensureDeferred
async def test_a_kept_alive_connection_is_reused(server, pool):
    upstream = server()
    client = pool()
    for _ in range(3):
        assert (await client.request(upstream.url, GET, 100)).body == b"{}"
    assert len(upstream.connections) == 1
    assert client.idle_connections() == 1


@pytest_twisted.ensureDeferred
async def test_concurrent_requests_use_separate_connections_and_at_most_max_idle_are_kept(server, pool):
    upstream = server()
    client = pool(max_idle_per_origin=2)
    answers = await defer.gatherResults([client.request(upstream.url, GET, 100) for _ in range(4)])
    assert [a.status for a in answers] == [200] * 4
    assert len(upstream.connections) == 4
    assert client.idle_connections() == 2


@pytest.mark.parametrize("closing", [b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
                                     b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}"])
@pytest_twisted.ensureDeferred
async def test_a_connection_the_upstream_closes_is_not_reused(server, pool, closing):
    upstream = server(closing)
    client = pool()
    assert (await client.request(upstream.url, GET, 100)).body == b"{}"
    assert (await client.request(upstream.url, GET, 100)).body == b"{}"
    assert len(upstream.connections) == 2


@pytest_twisted.ensureDeferred
async def test_close_delimited_body(server, pool):
    upstream = server(close_after(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end"))
    client = pool()
    assert (await client.request(upstream.url, GET, 100)).body == b"until the end"
    assert client.idle_connections() == 0


@pytest_twisted.ensureDeferred
async def test_chunked_body_over_the_network(server, pool):
    upstream = server(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
    client = pool()
    response = await client.request(upstream.url, GET, 100)
    assert response.body == b"hello world"
    assert (await client.request(upstream.url, GET, 100)).body == b"{}"
    assert len(upstream.connections) == 1


def feed(answer: bytes, step: int, *, method: str = "GET", limit: int = 1000):
    """Feed ``answer`` to a connection ``step`` bytes at a time; the exchange's result (or Failure)
    and whether the connection was kept."""
    pool = ConnectionPool(reactor)
    connection = _Connection(pool, Origin("http://upstream.example"))
    transport = StringTransport()
    connection.makeConnection(transport)
    exchange = _Exchange(pool, connection.origin, b"GET / HTTP/1.1\r\n\r\n", method == "HEAD", limit)
    connection.send(exchange)
    for i in range(0, len(answer), step):
        connection.dataReceived(answer[i:i + step])
    results = []
    exchange.deferred.addBoth(results.append)
    kept = pool.idle_connections() == 1
    return (results[0] if results else None), kept


CHUNKED = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"4\r\n{\"a\"\r\nB;name=value\r\n: \"0123456\"\r\n1\r\n}\r\n0\r\n\r\n")


@pytest.mark.parametrize("step", [1, 2, 7, 1000])
@pytest.mark.parametrize("answer, body", [
    (OK, b"{}"),
    (CHUNKED, b'{"a": "0123456"}'),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + OK, b"{}"),
    (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
    (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n", b""),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\n{}", b"{}"),
])
def test_an_answer_in_any_pieces_is_read_the_same(step, answer, body):
    response, kept = feed(answer, step)
    assert response.body == body
    assert kept


def test_head_answer_has_no_body_even_with_a_length():
    response, kept = feed(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", 1000, method="HEAD")
    assert (response.status, response.body, kept) == (200, b"", True)


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    OK + b"unasked",  # more than the length says
])
def test_doubtful_framing_is_read_but_the_connection_is_not_kept(answer):
    response, kept = feed(answer, 1000)
    assert response.body == b"{}"
    assert not kept


@pytest.mark.parametrize("answer", [
    b"HTTTP/1.1 200 OK\r\n\r\n",
    b"HTTP/2 200 OK\r\n\r\n",
    b"HTTP/1.1 20 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nbad name: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\nY: b\r\n\r\n",  # a bare LF
    b"HTTP/1.1 200 OK\r\nX: a\rY: b\r\n\r\n",  # a bare CR
    b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n",
    b"HTTP/1.1 200 O\rK\r\nX: a\r\n\r\n",  # a bare CR in the status line
    b"HTTP/1.1 200 O\x00K\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}XX0\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    b"HTTP/1.1 200 OK\n\n{}",
    b"HTTP/1.1 200 OK\r\n" + b"X: " + b"y" * 70000 + b"\r\n\r\n",
])
def test_a_malformed_answer_fails_like_treq_and_drops_the_connection(answer):
    failure, kept = feed(answer, 1000)
    assert failure.check(ResponseFailed), failure
    assert not kept


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\n123456\r\n5\r\n12345\r\n",
])
@pytest.mark.parametrize("step", [1, 1000])
def test_an_answer_over_the_limit_fails_without_reading_on(answer, step):
    failure, kept = feed(answer + b"x" * 11, step, limit=10)
    assert failure.check(ResponseTooLarge)
    assert failure.value.args == (10,)
    assert not kept


@pytest_twisted.ensureDeferred
async def test_a_close_delimited_answer_over_the_limit_fails(server, pool):
    upstream = server(close_after(b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 101))
    with pytest.raises(ResponseTooLarge):
        await pool().request(upstream.url, GET, 100)


@pytest_twisted.ensureDeferred
async def test_a_stale_pooled_connection_is_replaced_once(server, pool):
    # The upstream closes a kept-alive connection just as the next request arrives on it.
    upstream = server(OK, drop, OK)
    client = pool()
    await client.request(upstream.url, GET, 100)
    response = await client.request(upstream.url, GET, 100)
    assert response.status == 200
    assert len(upstream.requests) == 3
    assert len(upstream.connections) == 2


@pytest_twisted.ensureDeferred
async def test_a_new_connection_closed_without_an_answer_fails(server, pool):
    upstream = server(drop, drop)
    with pytest.raises(ResponseNeverReceived):
        await pool().request(upstream.url, GET, 100)
    assert len(upstream.requests) == 1


@pytest_twisted.ensureDeferred
async def test_a_connection_lost_in_the_middle_of_an_answer_fails(server, pool):
    upstream = server(close_after(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}"))
    with pytest.raises(ResponseFailed):
        await pool().request(upstream.url, GET, 100)


@pytest_twisted.ensureDeferred
async def test_connection_refused_is_twisteds_connect_error(pool):
    from twisted.internet.error import ConnectionRefusedError

    port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}"
    await port.stopListening()
    with pytest.raises(ConnectionRefusedError):
        await pool().request(url, GET, 100)


@pytest_twisted.ensureDeferred
async def test_cancelling_drops_the_connection(server, pool):
    upstream = server(None)  # holds the answer
    client = pool()
    call = client.request(upstream.url, GET, 100)
    while not upstream.requests:
        await deferLater0()
    closed = upstream.a_close()
    call.cancel()
    with pytest.raises(defer.CancelledError):
        await call
    await closed
    assert client.idle_connections() == 0


def deferLater0():
    from twisted.internet.task import deferLater
    return deferLater(reactor, 0, lambda: None)


@pytest_twisted.ensureDeferred
async def test_idle_connections_are_closed_after_the_idle_timeout(server, pool):
    upstream = server()
    clock = Clock()
    client = pool(idle_timeout=30, clock=clock)
    await client.request(upstream.url, GET, 100)
    clock.advance(29)
    assert client.idle_connections() == 1
    closed = upstream.a_close()
    clock.advance(1)
    await closed
    assert client.idle_connections() == 0
    assert not clock.getDelayedCalls()


@pytest_twisted.ensureDeferred
async def test_an_upstream_speaking_out_of_turn_loses_its_idle_connection(server, pool):
    upstream = server(lambda p: p.transport.write(OK + b"HTTP/1.1 200 OK\r\n"), default=OK)
    client = pool()
    await client.request(upstream.url, GET, 100)  # leftover bytes: not kept
    assert client.idle_connections() == 0


@pytest_twisted.ensureDeferred
async def test_close_closes_idle_connections(server, pool):
    upstream = server()
    client = pool()
    await defer.gatherResults([client.request(upstream.url, GET, 100) for _ in range(3)])
    await client.close()
    assert client.idle_connections() == 0
    while len(upstream.closed) < 3:  # the server sees it a little later
        await deferLater0()


def test_request_head_keeps_header_values_on_one_line():
    origin = Origin("https://api.example")
    head = request_head(origin, UpstreamRequest("GET", "/a b/ü", (), {"X-Note": "one\r\nInjected: yes"}), "ua")
    assert head.split(b"\r\n") == [b"GET /a%20b/%C3%BC HTTP/1.1", b"Host: api.example", b"X-Note: one  Injected: yes",
                                   b"User-Agent: ua", b"", b""]
    with pytest.raises(ValueError):
        request_head(origin, UpstreamRequest("GET", "/", (), {"Bad Name": "x"}), "ua")


@pytest_twisted.ensureDeferred
async def test_a_head_is_written_again_for_whatever_changed_in_its_request(server, pool, monkeypatch):
    monkeypatch.setattr("ambassador.pipeline.http1client.HEADS_KEPT", 2)
    upstream = server()
    client = pool()
    sent = [GET, GET, UpstreamRequest("GET", "/3/movie/550", (("api_key", "rotated"),)),
            UpstreamRequest("GET", "/3/movie/550", (), {"Authorization": "Bearer t"}),
            UpstreamRequest("GET", "/3/movie/550", (), {"Authorization": "Bearer rotated"}), GET]
    for request in sent:
        await client.request(upstream.url, request, 100)
    assert [head.split(b"\r\n")[0] for head, _ in upstream.requests] == [
        b"GET /3/movie/550?api_key=k&q=a+b%26c HTTP/1.1"] * 2 + [b"GET /3/movie/550?api_key=rotated HTTP/1.1"] + [
        b"GET /3/movie/550 HTTP/1.1"] * 2 + [b"GET /3/movie/550?api_key=k&q=a+b%26c HTTP/1.1"]
    assert [head.split(b"\r\n")[2] for head, _ in upstream.requests[3:5]] == [
        b"Authorization: Bearer t", b"Authorization: Bearer rotated"]
    assert len(client._heads) == 2  # the most it keeps


def test_request_head_host_and_user_agent_can_be_given():
    head = request_head(Origin("http://[::1]:8080"), UpstreamRequest("GET", "/", (), {"user-agent": "mine"}), "ua")
    assert head == b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\nuser-agent: mine\r\n\r\n"


@pytest_twisted.ensureDeferred
async def test_send_now_sends_at_once_and_keeps_order_behind_queued_data(server):
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    from ambassador.sockets import send_now

    upstream = server(None, default=None)
    client = Protocol()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", int(upstream.url.rsplit(":", 1)[1])), client)
    transport = client.transport
    send_now(transport, b"GET /1 HTTP/1.1\r\n\r\n")
    assert not transport._tempDataBuffer and not transport.dataBuffer  # sent, not queued
    transport.write(b"GET /2 HTTP/1.1\r\n")  # queued by Twisted: what follows must wait behind it
    send_now(transport, b"\r\n")
    assert transport._tempDataBuffer
    while len(upstream.requests) < 2:
        await deferLater0()
    assert [head for head, _ in upstream.requests] == [b"GET /1 HTTP/1.1", b"GET /2 HTTP/1.1"]
    transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_cancelled_request_fails_as_cancelled_on_both_paths(fake_tmdb):
    client = UpstreamClient(reactor)
    fake_tmdb.fault = "hang"
    try:
        for n, request in enumerate((UpstreamRequest("GET", "/3/movie/550"),  # the lean client
                                     UpstreamRequest("POST", "/3/list", body=b"{}")), start=1):  # treq
            call = client.fetch(fake_tmdb.base_url, request)
            await reactor_turns_until(lambda: len(fake_tmdb.hanging) == n)
            call.cancel()
            with pytest.raises(defer.CancelledError):
                await call
    finally:
        await client.close()
