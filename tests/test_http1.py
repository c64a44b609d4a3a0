"""The proxy port's HTTP/1.1 protocol: keep-alive, pipelining, framing, flow control and timeouts.

Driven over Twisted's StringTransport with a Clock and a factory that records what it is given;
the limits and refusals over real TCP are in test_limits.py, the targets in test_no_ssrf.py.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from ambassador.web.http1 import HTTP1Factory
from ambassador.web.limits import InboundLimits
from conftest import parse_response
from test_limits import HalfClosableTransport


class Recorder(HTTP1Factory):
    """Answers each request with its body, at once or when told (``at_once=False``)."""

    def __init__(self, clock, *, at_once=True, **limits) -> None:
        super().__init__(clock, InboundLimits(**limits))
        self.at_once = at_once
        self.served, self.left, self.refusals = [], [], []

    def serve(self, request) -> None:
        self.served.append(request)
        if self.at_once:
            answer(request)

    def gone(self, request) -> None:
        self.left.append(request)

    def refused(self, problem, request_id) -> None:
        self.refusals.append(problem.status)


def answer(request, status=200, headers=(("Content-Type", "text/plain"),)):
    request.respond(status, list(headers), b"got " + request.method + b" " + request.target + b" " + request.body)


def connect(clock=None, **options):
    factory = Recorder(clock or Clock(), **options)
    connection = factory.buildProtocol(None)
    transport = HalfClosableTransport()
    connection.makeConnection(transport)
    return factory, connection, transport


def responses(raw: bytes) -> list[tuple[int, dict, bytes]]:
    """Every response in ``raw``, in order."""
    found = []
    while raw:
        status, headers, body = parse_response(raw)
        head_length = raw.index(b"\r\n\r\n") + 4
        raw = raw[head_length + int(headers.get("content-length", 0)):]
        found.append((status, headers, body))
    return found


def test_a_connection_serves_one_request_after_another():
    factory, connection, transport = connect()
    for n in range(3):
        connection.dataReceived(b"GET /a?n=%d HTTP/1.1\r\nHost: x\r\n\r\n" % n)
    [first, *_, last] = responses(transport.value())
    assert len(responses(transport.value())) == 3
    assert last[2] == b"got GET /a?n=2 " and first[1]["content-length"] == str(len(first[2]))
    assert "date" in first[1] and "connection" not in first[1] and not transport.disconnecting
    assert [r.path for r in factory.served] == [b"/a"] * 3 and factory.served[0].query == b"n=0"


def test_pipelined_requests_are_answered_in_order_one_at_a_time():
    factory, connection, transport = connect(at_once=False)
    connection.dataReceived(b"".join(b"GET /%d HTTP/1.1\r\n\r\n" % n for n in range(3)))
    assert [r.target for r in factory.served] == [b"/0"]  # the next waits for this answer
    answer(factory.served[0])
    assert [r.target for r in factory.served] == [b"/0", b"/1"]
    answer(factory.served[1])
    answer(factory.served[2])
    assert [body for _, _, body in responses(transport.value())] == [b"got GET /0 ", b"got GET /1 ", b"got GET /2 "]


def test_many_pipelined_requests_answered_at_once_do_not_nest():
    factory, connection, transport = connect()
    connection.dataReceived(b"GET / HTTP/1.1\r\n\r\n" * 5000)  # would exceed the recursion limit if nested
    assert len(factory.served) == 5000 and len(responses(transport.value())) == 5000


def test_connection_close_closes_after_the_answer_and_reads_nothing_more():
    factory, connection, transport = connect()
    connection.dataReceived(b"GET /1 HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\nGET /2 HTTP/1.1\r\n\r\n")
    [(status, headers, _)] = responses(transport.value())
    assert status == 200 and headers["connection"] == "close" and transport.disconnecting
    assert [r.target for r in factory.served] == [b"/1"]


@pytest.mark.parametrize("extra, persistent", [(b"", False), (b"Connection: Keep-Alive\r\n", True)])
def test_http_1_0_keeps_the_connection_only_when_asked(extra, persistent):
    _, connection, transport = connect()
    connection.dataReceived(b"GET / HTTP/1.0\r\n" + extra + b"\r\n")
    [(_, headers, _)] = responses(transport.value())
    assert headers["connection"] == ("keep-alive" if persistent else "close")
    assert transport.disconnecting is not persistent


def test_a_body_by_content_length_and_100_continue_when_the_caller_waits_for_it():
    factory, connection, transport = connect()
    connection.dataReceived(b"POST /p HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    assert transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n" and not factory.served
    connection.dataReceived(b"12")
    connection.dataReceived(b"345")
    assert factory.served[0].body == b"12345"
    assert parse_response(transport.value())[2] == b"got POST /p 12345"


def test_no_100_continue_when_the_body_is_there_already():
    factory, connection, transport = connect()
    connection.dataReceived(b"POST /p HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\nok")
    assert transport.value().startswith(b"HTTP/1.1 200 ") and factory.served[0].body == b"ok"


def test_a_chunked_body_arriving_byte_by_byte_with_extensions_and_trailers():
    factory, connection, transport = connect()
    message = (b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"3;ext=1\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nX-Trailer: 1\r\n\r\nGET /next HTTP/1.1\r\n\r\n")
    for byte in message:
        connection.dataReceived(bytes([byte]))
    assert [(r.target, r.body) for r in factory.served] == [(b"/p", b"abc0123456789abcdef"), (b"/next", b"")]


def test_lines_ending_in_a_bare_lf_are_accepted_and_empty_lines_before_a_request_ignored():
    factory, connection, transport = connect()
    connection.dataReceived(b"\r\n\nGET /lf HTTP/1.1\nX-A: 1\n\n")
    assert factory.served[0].target == b"/lf" and factory.served[0].headers["x-a"] == "1"


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",  # two hosts
    b"GET / HTTP/1.1\r\nX-A: 1\r\n folded\r\n\r\n",  # obsolete line folding
    b"GET\t/ HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1 extra\r\n\r\n",
    b"GET / HTTP/2.0\r\n\r\n",
    b"GET / HTTP/1.1\r\nX-A : 1\r\n\r\n",  # space before the colon
    b"GET / HTTP/1.1\r\nX-A: \x01\r\n\r\n",
    b"GET / HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n",  # a digit, but not an ASCII one
    b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX",  # no CRLF after the data
])
def test_what_is_not_http_1_1_is_refused_with_400(data):
    factory, connection, transport = connect()
    connection.dataReceived(data)
    assert parse_response(transport.value())[0] == 400 and transport.write_closed
    assert factory.refusals == [400] and not factory.served


@pytest.mark.parametrize("tail, status", [
    (b"0\r\nX-Trailer: " + b"a" * 200 + b"\r\n\r\n", 431),  # a trailer line beyond max_line
    (b"80\r\n" + b"a" * 128 + b"\r\n0\r\n\r\n", 413),  # chunks beyond max_body
])
def test_chunked_bodies_keep_to_the_limits(tail, status):
    factory, connection, transport = connect(max_line=100, max_body=100)
    connection.dataReceived(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + tail)
    assert parse_response(transport.value())[0] == status and factory.refusals == [status] and not factory.served


def test_head_answers_carry_the_length_but_no_body_and_204_304_neither():
    factory, connection, transport = connect(at_once=False)
    connection.dataReceived(b"HEAD /h HTTP/1.1\r\n\r\nGET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n")
    answer(factory.served[0])
    answer(factory.served[1], status=204)
    answer(factory.served[2], status=304)
    head, no_content, not_modified = transport.value().split(b"\r\n\r\n")[:3]
    assert head.endswith(b"\r\nContent-Length: %d" % len(b"got HEAD /h "))  # of the body it leaves out
    assert no_content.startswith(b"HTTP/1.1 204 ") and not_modified.startswith(b"HTTP/1.1 304 ")
    assert b"Content-Length" not in no_content + not_modified
    assert transport.value().endswith(b"\r\n\r\n")  # no body anywhere


def test_header_names_are_written_in_header_case():
    factory, connection, transport = connect(at_once=False)
    connection.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
    answer(factory.served[0], headers=[("content-type", "a/b"), ("etag", '"1"'), ("x-request-id", "r"),
                                       ("Cache-Status", "x")])
    head = transport.value().split(b"\r\n\r\n")[0]
    assert b"\r\nContent-Type: a/b\r\nETag: \"1\"\r\nX-Request-ID: r\r\nCache-Status: x\r\n" in head


def test_a_header_value_cannot_add_a_header():
    factory, connection, transport = connect(at_once=False)
    connection.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
    answer(factory.served[0], headers=[("X-A", "1\r\nSet-Cookie: stolen=1")])
    _, headers, _ = parse_response(transport.value())
    assert headers["x-a"] == "1 Set-Cookie: stolen=1" and "set-cookie" not in headers


def test_a_caller_leaving_before_the_answer_is_reported_and_the_late_answer_dropped():
    factory, connection, transport = connect(at_once=False)
    connection.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
    connection.connectionLost(None)
    assert factory.left == factory.served and factory.served[0].gone
    answer(factory.served[0])
    assert transport.value() == b""


def test_a_caller_that_does_not_read_its_answers_is_not_served_more():
    factory, connection, transport = connect()
    connection.pauseProducing()  # what the transport does when its buffer is full
    connection.dataReceived(b"GET /1 HTTP/1.1\r\n\r\n")
    assert factory.served == []
    connection.resumeProducing()
    assert [r.target for r in factory.served] == [b"/1"]


def test_pipelined_data_beyond_the_limits_stops_reading_until_the_answer():
    factory, connection, transport = connect(at_once=False, max_body=100, max_header_bytes=1000)
    connection.dataReceived(b"GET /1 HTTP/1.1\r\n\r\n")
    connection.dataReceived(b"GET /2 HTTP/1.1\r\nX-A: 1\r\n\r\n" * 50)
    assert transport.producerState == "paused"
    answer(factory.served[0])
    assert transport.producerState == "producing" and len(factory.served) == 2


def test_the_idle_timeout_waits_while_a_request_is_being_answered():
    clock = Clock()
    factory, connection, transport = connect(clock, at_once=False, idle_timeout=60)
    connection.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
    clock.advance(100)
    assert not transport.disconnecting
    answer(factory.served[0])
    clock.advance(59.9)
    assert not transport.disconnecting
    clock.advance(0.1)
    assert transport.disconnecting


def test_the_factory_knows_its_connections():
    factory, connection, _ = connect()
    assert factory.connections == {connection}
    connection.connectionLost(None)
    assert factory.connections == set()


def test_closing_ends_idle_connections_now_and_busy_ones_after_their_answer():
    factory, idle, idle_transport = connect(at_once=False)
    busy, busy_transport = factory.buildProtocol(None), HalfClosableTransport()
    busy.makeConnection(busy_transport)
    reading, reading_transport = factory.buildProtocol(None), HalfClosableTransport()
    reading.makeConnection(reading_transport)
    busy.dataReceived(b"GET /busy HTTP/1.1\r\n\r\n")
    reading.dataReceived(b"GET /reading HTTP/1.1\r\n")  # half a request
    factory.close_connections()
    assert idle_transport.disconnecting and not busy_transport.disconnecting and not reading_transport.disconnecting
    answer(factory.served[0])
    assert parse_response(busy_transport.value())[1]["connection"] == "close" and busy_transport.disconnecting
    reading.dataReceived(b"\r\n")
    answer(factory.served[1])
    assert parse_response(reading_transport.value())[1]["connection"] == "close" and reading_transport.disconnecting


PIPELINE = [  # (bytes on the wire, what the factory must be given)
    (b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\n\r\n", (b"GET", b"/a?x=1", b"")),
    (b"POST /b HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", (b"POST", b"/b", b"hello")),
    (b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhe\r\n3;x=y\r\nllo\r\n0\r\nT: 1\r\n\r\n",
     (b"POST", b"/c", b"hello")),
    (b"\r\nHEAD /d HTTP/1.1\nX-A: 1\n\n", (b"HEAD", b"/d", b"")),
    (b"GET /e HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", (b"GET", b"/e", b"")),
    (b"GET /f HTTP/1.1\r\nX-A: 1\r\n\n", (b"GET", b"/f", b"")),  # heads ending in mixed line ends
    (b"GET /g HTTP/1.1\nX-A: 1\n\r\n", (b"GET", b"/g", b"")),
]


@settings(max_examples=300, deadline=None)
@given(order=st.permutations(range(len(PIPELINE))), cuts=st.lists(st.integers(1, 40), max_size=60))
def test_requests_read_the_same_however_the_bytes_are_split(order, cuts):
    factory, connection, transport = connect()
    data = b"".join(PIPELINE[i][0] for i in order)
    at = 0
    for size in cuts + [len(data)]:
        connection.dataReceived(data[at:at + size])
        at += size
    assert [(r.method, r.target, r.body) for r in factory.served] == [PIPELINE[i][1] for i in order]
    assert transport.value().count(b"HTTP/1.1 200 OK\r\n") == len(order) and not factory.refusals
