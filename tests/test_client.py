"""The upstream client (ambassador.pipeline.client), over loopback against scripted Twisted servers:
framing, the byte cap, connection reuse, stale and condemned connections, answers cut short,
cancellation, and how failures map into the client's contract.
"""

from __future__ import annotations

import gzip
import socket
import struct
import tracemalloc

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol

from ambassador.exchange import UpstreamRequest
from twisted.web.client import Agent, HTTPConnectionPool

from ambassador.pipeline.client import ResponseTooLarge, UnreadableAnswer, UpstreamClient, UpstreamFailed
from ambassador.pipeline.decoding import CHUNK, DecodingAgent
from ambassador.pipeline.resilience import Policy
from conftest import get, reactor_turns_until

GET = UpstreamRequest("GET", "/3/movie/550", (("api_key", "k"), ("q", "a b&c")))
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
CUT = "the connection failed before a complete answer arrived"


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
async def client():
    clients = []

    def make(**kwargs):
        clients.append(UpstreamClient(reactor, user_agent="ambassador-test", **kwargs))
        return clients[-1]

    yield make
    for made in clients:
        await made.close()


def close_after(answer: bytes):
    def act(protocol):
        protocol.transport.write(answer)
        protocol.transport.loseConnection()
    return act


def reset_after(answer: bytes):
    """Send ``answer``, then reset the connection (RST, not FIN)."""
    def act(protocol):
        protocol.transport.getHandle().sendall(answer)  # now, not queued: a reset would discard the queue
        reactor.callLater(0, _reset, protocol.transport)
    return act


def _reset(transport) -> None:
    transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abortConnection()


def drop(protocol):
    protocol.transport.abortConnection()


async def failure_of(call) -> UpstreamFailed:
    with pytest.raises(UpstreamFailed) as failed:
        await call
    return failed.value


@pytest_twisted.ensureDeferred
async def test_content_length_answer_and_the_request_sent(server, client):
    upstream = server(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n"
                      b"X-Twice: a\r\nx-twice: b\r\n\r\n{\"id\": 550}\n!")
    response = await client().fetch(upstream.url, GET, max_body=1000)
    assert response.status == 200
    assert response.body == b'{"id": 550}\n!'
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-twice"] == "a, b"
    head, _ = upstream.requests[0]
    lines = head.split(b"\r\n")
    assert lines[0] == b"GET /3/movie/550?api_key=k&q=a+b%26c HTTP/1.1"
    port = upstream.url.rsplit(":", 1)[1]
    assert f"Host: 127.0.0.1:{port}".encode() in lines[1:]
    assert not any(line.lower().startswith(b"accept-encoding") for line in lines)  # treq's gzip taken back
    assert b"User-Agent: ambassador-test" in lines[1:]


@pytest_twisted.ensureDeferred
async def test_header_values_stay_on_one_line_and_paths_are_quoted(server, client):
    upstream = server()
    await client().fetch(upstream.url, UpstreamRequest("GET", "/a b/ü", (), {"X-Note": "one\r\nInjected: yes"}))
    lines = upstream.requests[0][0].split(b"\r\n")
    assert lines[0] == b"GET /a%20b/%C3%BC HTTP/1.1"
    assert not any(line.lower().startswith(b"injected") for line in lines)


@pytest_twisted.ensureDeferred
async def test_a_kept_alive_connection_is_reused(server, client):
    upstream = server()
    upstream_client = client()
    for _ in range(3):
        assert (await upstream_client.fetch(upstream.url, GET, max_body=100)).body == b"{}"
    assert len(upstream.connections) == 1


@pytest.mark.parametrize("closing", [b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
                                     b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}"])
@pytest_twisted.ensureDeferred
async def test_a_connection_the_upstream_closes_is_not_reused(server, client, closing):
    upstream = server(close_after(closing))
    upstream_client = client()
    assert (await upstream_client.fetch(upstream.url, GET, max_body=100)).body == b"{}"
    assert (await upstream_client.fetch(upstream.url, GET, max_body=100)).body == b"{}"
    assert len(upstream.connections) == 2


@pytest_twisted.ensureDeferred
async def test_a_close_delimited_body_ended_by_a_clean_close(server, client):
    upstream = server(close_after(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end"))
    assert (await client().fetch(upstream.url, GET, max_body=100)).body == b"until the end"


@pytest_twisted.ensureDeferred
async def test_a_close_delimited_body_ended_by_a_reset_failed(server, client):
    upstream = server(reset_after(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the"))
    assert (await failure_of(client().fetch(upstream.url, GET, max_body=100))).reason == CUT


@pytest_twisted.ensureDeferred
async def test_fewer_bytes_than_content_length_failed(server, client):
    upstream = server(close_after(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}"))
    assert (await failure_of(client().fetch(upstream.url, GET, max_body=100))).reason == CUT


@pytest_twisted.ensureDeferred
async def test_chunked_body_over_the_network(server, client):
    upstream = server(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
    upstream_client = client()
    assert (await upstream_client.fetch(upstream.url, GET, max_body=100)).body == b"hello world"
    assert (await upstream_client.fetch(upstream.url, GET, max_body=100)).body == b"{}"
    assert len(upstream.connections) == 1


def in_two_byte_chunks(size: int):
    """A chunked answer of ``size`` bytes, two bytes a chunk, each chunk written on its own."""
    def act(protocol):
        protocol.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(size // 2):
            protocol.transport.write(b"2\r\nxx\r\n")
        if size % 2:
            protocol.transport.write(b"1\r\nx\r\n")
        protocol.transport.write(b"0\r\n\r\n")
    return act


@pytest_twisted.ensureDeferred
async def test_the_cap_counts_bytes_however_the_answer_is_chunked(server, client):
    limit = 10001
    upstream = server(in_two_byte_chunks(limit), in_two_byte_chunks(limit + 1))
    upstream_client = client()
    assert len((await upstream_client.fetch(upstream.url, GET, max_body=limit)).body) == limit
    with pytest.raises(ResponseTooLarge):
        await upstream_client.fetch(upstream.url, GET, max_body=limit)
    await reactor_turns_until(lambda: len(upstream.closed) == 1)  # dropped at the cap


@pytest.mark.parametrize("answer", [b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 101,
                                    b"HTTP/1.1 200 OK\r\nContent-Length: 101\r\n\r\n"])
@pytest_twisted.ensureDeferred
async def test_an_answer_over_the_limit_fails_and_the_connection_is_dropped(server, client, answer):
    upstream = server(answer)  # the declared length alone is enough: the body never comes
    with pytest.raises(ResponseTooLarge):
        await client().fetch(upstream.url, GET, max_body=100)
    await reactor_turns_until(lambda: len(upstream.closed) == 1)


@pytest_twisted.ensureDeferred
async def test_a_stale_pooled_connection_is_replaced_once(server, client):
    # The upstream closes a kept-alive connection just as the next request arrives on it.
    upstream = server(OK, drop, OK)
    upstream_client = client()
    await upstream_client.fetch(upstream.url, GET, max_body=100)
    response = await upstream_client.fetch(upstream.url, GET, max_body=100)
    assert response.status == 200
    assert len(upstream.requests) == 3
    assert len(upstream.connections) == 2


@pytest_twisted.ensureDeferred
async def test_bytes_arriving_unasked_condemn_an_idle_connection(server, client):
    upstream = server()
    upstream_client = client()
    assert (await upstream_client.fetch(upstream.url, GET, max_body=100)).body == b"{}"
    # The connection is idle in the pool now; the upstream speaks out of turn on it.
    upstream.connections[0].transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nWRONG")
    await reactor_turns_until(lambda: len(upstream.closed) == 1)  # the client dropped it
    assert (await upstream_client.fetch(upstream.url, GET, max_body=100)).body == b"{}"
    assert len(upstream.connections) == 2


@pytest_twisted.ensureDeferred
async def test_a_new_connection_closed_without_an_answer_failed(server, client):
    upstream = server(drop, drop)
    assert (await failure_of(client().fetch(upstream.url, GET, max_body=100))).reason == CUT
    assert len(upstream.requests) == 1


@pytest_twisted.ensureDeferred
async def test_connection_refused_could_not_connect(client):
    port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}"
    await port.stopListening()
    failed = await failure_of(client().fetch(url, GET, max_body=100))
    assert failed.reason == "could not connect (connection refused)"


@pytest_twisted.ensureDeferred
async def test_no_redirect_is_followed_and_no_cookie_is_kept(server, client):
    upstream = server(b"HTTP/1.1 302 Found\r\nLocation: http://elsewhere.invalid/\r\nSet-Cookie: s=1; Path=/\r\n"
                      b"Content-Length: 0\r\n\r\n")
    upstream_client = client()
    assert (await upstream_client.fetch(upstream.url, GET, max_body=100)).status == 302
    await upstream_client.fetch(upstream.url, GET, max_body=100)
    assert len(upstream.requests) == 2
    assert b"cookie:" not in upstream.requests[1][0].lower()


@pytest_twisted.ensureDeferred
async def test_cancelling_drops_the_connection(server, client):
    upstream = server(None)  # holds the answer
    call = client().fetch(upstream.url, GET, max_body=100)
    await reactor_turns_until(lambda: upstream.requests)
    call.cancel()
    with pytest.raises(defer.CancelledError):
        await call
    await reactor_turns_until(lambda: len(upstream.closed) == 1)


@pytest_twisted.ensureDeferred
async def test_close_closes_idle_connections(server, client):
    upstream = server()
    upstream_client = client()
    await defer.gatherResults([upstream_client.fetch(upstream.url, GET, max_body=100) for _ in range(3)])
    await upstream_client.close()
    await reactor_turns_until(lambda: len(upstream.closed) == 3)


@pytest_twisted.ensureDeferred
async def test_a_cancelled_request_fails_as_cancelled_with_or_without_a_body(fake_tmdb):
    upstream_client = UpstreamClient(reactor)
    fake_tmdb.fault = "hang"
    try:
        for n, request in enumerate((UpstreamRequest("GET", "/3/movie/550"),
                                     UpstreamRequest("POST", "/3/list", body=b"{}")), start=1):
            call = upstream_client.fetch(fake_tmdb.base_url, request)
            await reactor_turns_until(lambda: len(fake_tmdb.hanging) == n)
            call.cancel()
            with pytest.raises(defer.CancelledError):
                await call
    finally:
        await upstream_client.close()


GOOD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nCache-Control: max-age=600\r\nContent-Length: 15\r\n\r\n" \
       b'{"results": []}'


# The reset comes after what would parse as a whole answer: only the reset says it was cut.
@pytest.mark.parametrize("cut", [reset_after(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                             b"Cache-Control: max-age=600\r\n\r\n{\"results\": []}"),
                                 close_after(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                             b"Cache-Control: max-age=600\r\nContent-Length: 15\r\n\r\n{\"res")])
@pytest_twisted.ensureDeferred
async def test_an_answer_cut_short_is_502_and_not_cached(server, start_ambassador, cut):
    upstream = server(cut, default=GOOD)
    ambassador = await start_ambassador({"TMDB_BASE_URL": upstream.url, "TMDB_API_KEY": "test-api-key"},
                                        policies={"tmdb": Policy(retries=0)})
    response, body = await get(ambassador.url + "/movies")
    assert response.code == 502
    assert b"test-api-key" not in body
    response, body = await get(ambassador.url + "/movies")
    assert response.code == 200
    assert len(upstream.requests) == 2  # the cut answer was not kept: the second asked the upstream


@pytest_twisted.ensureDeferred
async def test_a_gzip_answer_sent_unasked_is_decoded_and_held_to_the_cap_decoded(server, client):
    packed = gzip.compress(b"x" * 5000)
    upstream = server(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(packed), packed),
                      default=b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Encoding: gzip\r\n\r\n%s"
                      % (len(packed), packed))
    upstream_client = client()
    response = await upstream_client.fetch(upstream.url, GET, max_body=5000)
    assert response.body == b"x" * 5000
    assert "content-encoding" not in response.headers
    with pytest.raises(ResponseTooLarge):
        await upstream_client.fetch(upstream.url, GET, max_body=4999)
    assert "content-encoding" not in (await upstream_client.fetch(server().url, GET)).headers


@pytest.mark.parametrize("asked, sent", [("identity", []), ("gzip", [b"accept-encoding: gzip"])])
@pytest_twisted.ensureDeferred
async def test_accept_encoding_is_what_the_adapter_asks_for_not_a_header_it_sets(server, client, asked, sent):
    # A coding the client cannot decode would only come back as a 502: the one way to ask is accept_encoding.
    upstream = server()
    await client().fetch(upstream.url, UpstreamRequest("GET", "/", (), {"Accept-Encoding": "br"}),
                         accept_encoding=asked)
    lines = upstream.requests[0][0].lower().split(b"\r\n")
    assert [line for line in lines if line.startswith(b"accept-encoding")] == sent


def _certificate_for_localhost():
    """A self-signed certificate and key (PEM) naming localhost in its subjectAltName."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    return (certificate.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


@pytest_twisted.ensureDeferred
async def test_https_is_verified_through_the_tls_policy(client):
    from twisted.internet import ssl
    from twisted.web.client import BrowserLikePolicyForHTTPS

    certificate_pem, key_pem = _certificate_for_localhost()
    server_certificate = ssl.PrivateCertificate.loadPEM(certificate_pem + key_pem)
    upstream = ScriptedServer()
    port = reactor.listenSSL(0, upstream, server_certificate.options(), interface="127.0.0.1")
    try:
        url = f"https://localhost:{port.getHost().port}"
        trusting = client(tls_policy=BrowserLikePolicyForHTTPS(ssl.Certificate.loadPEM(certificate_pem)))
        assert (await trusting.fetch(url, GET, max_body=100)).body == b"{}"
        failed = await failure_of(client().fetch(url, GET, max_body=100))  # the system trust store: not trusted
        assert failed.reason.startswith("the TLS handshake failed")
        assert len(upstream.requests) == 1
    finally:
        for connection in upstream.connections:
            connection.transport.abortConnection()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_head_answer_has_no_body_even_with_a_length(server, client):
    upstream = server(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
    upstream_client = client()
    response = await upstream_client.fetch(upstream.url, UpstreamRequest("HEAD", "/"), max_body=100)
    assert (response.status, response.body, response.headers["content-length"]) == (200, b"", "2")
    assert (await upstream_client.fetch(upstream.url, GET, max_body=100)).body == b"{}"
    assert len(upstream.connections) == 1  # kept alive after it


# ---------------------------------------------------------------- compressed answers (pipeline/decoding.py)

BOMB = gzip.compress(bytes(10 * 1024 * 1024), 9)  # 10 MiB of zeros in ~10 KiB
CAP = 1024 * 1024


def gzip_answer(body: bytes, *, coding: bytes = b"gzip") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: %s\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (coding, len(body), body))


@pytest_twisted.ensureDeferred
async def test_a_decompression_bomb_is_too_large_at_the_cap_and_memory_stays_bounded(server, client):
    upstream = server(gzip_answer(BOMB))
    assert len(BOMB) < 20 * 1024
    tracemalloc.start()
    try:
        with pytest.raises(ResponseTooLarge):
            await client().fetch(upstream.url, GET, max_body=CAP, accept_encoding="gzip")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The cap, the collector's growth past it, one piece of decoding and Twisted's own: not the 10 MiB decoded.
    assert peak < CAP + 4 * CHUNK + 512 * 1024, peak
    await reactor_turns_until(lambda: upstream.closed)  # the connection is dropped, not kept for reuse


class Reading(Protocol):
    """Reads a body piece by piece, stopping the body once it holds ``stop_at`` bytes."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.pieces: list[int] = []
        self.stop_at = stop_at
        self.done: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.pieces.append(len(data))
        if self.stop_at is not None and sum(self.pieces) >= self.stop_at:
            self.transport.stopProducing()

    def connectionLost(self, reason) -> None:
        self.done.callback(None)


async def read_through_decoding_agent(url: str, reader: Reading) -> Reading:
    agent = DecodingAgent(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
    response = await agent.request(b"GET", url.encode())
    assert response.headers.getRawHeaders(b"content-encoding") is None
    response.deliverBody(reader)
    await reader.done
    return reader


@pytest_twisted.ensureDeferred
async def test_the_decoder_hands_over_at_most_one_chunk_at_a_time_and_stops_with_its_reader(server):
    upstream = server(gzip_answer(BOMB), gzip_answer(BOMB))
    whole = await read_through_decoding_agent(upstream.url, Reading())
    assert sum(whole.pieces) == 10 * 1024 * 1024 and max(whole.pieces) <= CHUNK
    stopped = await read_through_decoding_agent(upstream.url, Reading(stop_at=CAP))
    assert CAP <= sum(stopped.pieces) <= CAP + CHUNK  # nothing more was inflated once the reader stopped


@pytest_twisted.ensureDeferred
async def test_gzip_members_one_after_another_and_an_empty_gzip_body_are_read(server, client):
    upstream = server(gzip_answer(gzip.compress(b'{"a": ') + gzip.compress(b"1}")),
                      b"HTTP/1.1 204 No Content\r\nContent-Encoding: gzip\r\n\r\n")
    upstream_client = client()
    response = await upstream_client.fetch(upstream.url, GET, accept_encoding="gzip")
    assert response.body == b'{"a": 1}'
    assert "content-encoding" not in response.headers and "content-length" not in response.headers
    assert (await upstream_client.fetch(upstream.url, GET, accept_encoding="gzip")).body == b""


@pytest.mark.parametrize("body", [
    b"\x1f\x8b\x08\x00" + b"not deflate at all" * 10,  # a gzip header, then garbage
    gzip.compress(b'{"results": []}' * 100)[:-12],  # cut short, with a Content-Length that matches the cut
    gzip.compress(b"{}") + b"trailing garbage",
])
@pytest_twisted.ensureDeferred
async def test_a_corrupt_or_truncated_gzip_stream_is_unreadable(server, client, body):
    upstream = server(gzip_answer(body))
    with pytest.raises(UnreadableAnswer) as raised:
        await client().fetch(upstream.url, GET, accept_encoding="gzip")
    assert raised.value.reason == "a corrupt or truncated gzip stream"


@pytest_twisted.ensureDeferred
async def test_a_coding_the_client_does_not_decode_is_unreadable_and_not_read(server, client):
    upstream = server(gzip_answer(b"\x0b\x02\x80{}\x03", coding=b"br"), gzip_answer(gzip.compress(b"{}"),
                                                                                    coding=b"gzip, deflate"))
    upstream_client = client()
    for _ in range(2):
        with pytest.raises(UnreadableAnswer) as raised:
            await upstream_client.fetch(upstream.url, GET)
        assert raised.value.reason == "a content coding the ambassador does not decode"
    await reactor_turns_until(lambda: len(upstream.closed) == 2)  # each body left unread: its connection dropped
