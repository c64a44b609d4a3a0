"""Bounds on what a caller can make the ambassador hold: the inbound HTTP channel.

twisted.web's HTTPChannel parses strictly and limits line length, header
count and header bytes, but it answers a bare ``400`` or just closes, keeps
request bodies of any size (in a temporary file beyond 100 kB), and has only
an idle timeout, which a client trickling one byte at a time never trips.
This channel answers every refusal in problem+json, bounds the body, and
gives a caller ``read_timeout`` seconds to send a whole request.
"""

from __future__ import annotations

from http import HTTPStatus
from io import BytesIO
from random import getrandbits

from attrs import frozen
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

from ambassador.problems import PROBLEM_CONTENT_TYPE, Problem

access_log = Logger(namespace="ambassador.access")


@frozen
class InboundLimits:
    """What one caller may send; every limit answers a problem and closes the connection."""

    max_line: int = 8192  # the request line (414) and each header line (431)
    max_header_bytes: int = 32768  # request line and all header lines together (431)
    max_headers: int = 100  # (431)
    max_body: int = 65536  # request body, declared or chunked (413)
    idle_timeout: float = 60.0  # seconds a connection may stay silent (closed, no answer)
    read_timeout: float = 10.0  # seconds from a request's first byte to its last (408)
    max_connections: int = 512  # inbound connections open at once (503 beyond)


def bad_request() -> Problem:
    return Problem(400, "bad-request", "Malformed request",
                   "The request line or a header is not valid HTTP/1.1.")


def target_too_long(limits: InboundLimits) -> Problem:
    return Problem(414, "target-too-long", "Request target too long",
                   f"The request line may be at most {limits.max_line} bytes.")


def headers_too_large(limits: InboundLimits) -> Problem:
    return Problem(431, "headers-too-large", "Request headers too large",
                   f"At most {limits.max_headers} headers of at most {limits.max_line} bytes each, "
                   f"{limits.max_header_bytes} bytes with the request line.")


def body_too_large(limits: InboundLimits) -> Problem:
    return Problem(413, "body-too-large", "Request body too large",
                   f"A request body may be at most {limits.max_body} bytes.")


def too_slow(limits: InboundLimits) -> Problem:
    return Problem(408, "request-timeout", "Request took too long to arrive",
                   f"A whole request must arrive within {limits.read_timeout:g} s of its first byte.")


def too_many_connections(limits: InboundLimits) -> Problem:
    return Problem(503, "too-many-connections", "Too many connections",
                   f"The ambassador serves at most {limits.max_connections} connections at once; "
                   "close idle ones or retry shortly.", headers=[("Retry-After", "1")])


def new_request_id() -> str:
    # 128 random bits like uuid4().hex, without a getrandom system call per request: an id
    # must be unique, not unpredictable. (%-formatting is about twice as fast as an f-string here.)
    return "%032x" % getrandbits(128)


def refuse_and_linger(transport, problem: Problem, refused, linger: float, call_later):
    """Answer ``problem`` (after telling ``refused``) and close; returns the call that cuts the caller off.

    Closing at once while the caller is still sending would make the kernel
    reset the connection, and the caller could lose the answer before
    reading it. So only our side is closed; what still arrives is read and
    dropped (by the protocol) until the caller closes, or for at most ``linger`` seconds.
    """
    request_id = new_request_id()
    refused(problem, request_id)
    transport.write(problem_response(problem, request_id))
    transport.loseWriteConnection()
    return call_later(linger, transport.abortConnection)


def problem_response(problem: Problem, request_id: str) -> bytes:
    """A whole HTTP/1.1 response for ``problem``, written before (or instead of) any Request."""
    body = problem.body(request_id=request_id)
    lines = [
        f"HTTP/1.1 {problem.status} {HTTPStatus(problem.status).phrase}".encode(),
        b"Content-Type: " + PROBLEM_CONTENT_TYPE.encode(),
        b"Content-Length: %d" % len(body),
        b"X-Request-ID: " + request_id.encode(),
        b"Connection: close",
        *(f"{name}: {value}".encode("latin-1") for name, value in problem.headers),
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class BoundedRequest(Request):
    """A Request whose body is kept in memory and refused beyond ``max_body``; no target is special."""

    def gotLength(self, length) -> None:
        # Never a temporary file: the body is bounded, and the root filesystem may be read-only.
        self.content = BytesIO()

    def _handleStar(self) -> None:
        # Twisted answers a request for "*" (OPTIONS *) itself; the Site refuses it like any other target.
        self.render(self.site.getResourceFor(self))

    def handleContentChunk(self, data: bytes) -> None:
        if self.content.tell() + len(data) > self.channel.limits.max_body:
            self.channel.refuse(body_too_large(self.channel.limits))
        else:
            self.content.write(data)


class LimitedChannel(HTTPChannel):
    """HTTPChannel with ``limits``, problem+json refusals, a read deadline and a connection count,
    for a LimitedSite."""

    limits = InboundLimits()
    _deadline = None
    _refused = False

    def connectionMade(self) -> None:
        self.MAX_LENGTH = self.limits.max_line
        self.totalHeadersSize = self.limits.max_header_bytes
        self.maxHeaders = self.limits.max_headers
        self.site.connections += 1
        super().connectionMade()

    def connectionLost(self, reason) -> None:
        self.site.connections -= 1
        self._stop_deadline()
        super().connectionLost(reason)

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return  # lingering after a refusal: read and drop
        if self._deadline is None and not self._handlingRequest:
            self._deadline = self.callLater(self.limits.read_timeout, self.refuse, too_slow(self.limits))
        super().dataReceived(data)

    def headerReceived(self, line: bytes) -> bool:
        name, _, value = line.partition(b":")
        value = value.strip()
        if name.lower() == b"content-length" and value.isdigit() and int(value) > self.limits.max_body:
            self.refuse(body_too_large(self.limits))
            return False
        return super().headerReceived(line)

    def allContentReceived(self) -> None:
        if self._refused:  # a chunked body may end after it was refused
            return
        self._stop_deadline()
        super().allContentReceived()

    def lineLengthExceeded(self, line: bytes) -> None:
        reading_request_line = not self.requests
        self.refuse(target_too_long(self.limits) if reading_request_line else headers_too_large(self.limits))

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted calls this for every request it cannot parse or that breaks its header limits.
        too_many = self._receivedHeaderCount > self.maxHeaders
        self.refuse(headers_too_large(self.limits) if too_many or self._receivedHeaderSize > self.totalHeadersSize
                    else bad_request())

    def refuse(self, problem: Problem) -> None:
        """Answer ``problem`` and close, dropping whatever else the caller sends (``refuse_and_linger``)."""
        if self._refused:
            return
        self._refused = True
        self.clearLineBuffer()  # parse nothing more of what already arrived
        self._stop_deadline()
        self._deadline = refuse_and_linger(self.transport, problem, self.site.refused, self.limits.read_timeout,
                                           self.callLater)

    def _stop_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None


class Overloaded(Protocol):
    """Stands in for a connection beyond ``max_connections`` (of ``site``, which has ``limits`` and
    ``refused``): answers 503 and closes."""

    def __init__(self, site) -> None:
        self._site = site

    def connectionMade(self) -> None:
        problem, request_id = too_many_connections(self._site.limits), new_request_id()
        self._site.refused(problem, request_id)
        self.transport.write(problem_response(problem, request_id))
        self.transport.loseConnection()


class LimitedSite(Site):
    """A Site whose connections keep to ``limits``; ``reactor`` times them."""

    protocol = LimitedChannel
    requestFactory = BoundedRequest
    displayTracebacks = False

    def __init__(self, resource, *, limits: InboundLimits = InboundLimits(), reactor=None) -> None:
        super().__init__(resource, timeout=limits.idle_timeout, reactor=reactor, parsePOSTFormSubmission=False)
        self.limits = limits
        self.connections = 0

    def buildProtocol(self, addr):
        if self.connections >= self.limits.max_connections:
            return Overloaded(self)
        channel = super().buildProtocol(addr)
        channel.limits = self.limits
        return channel

    def refused(self, problem: Problem, request_id: str) -> None:
        """Called for each problem answered before a request was read whole."""
        access_log.info("Refused {status} {problem} id={request_id}", status=problem.status, problem=problem.kind,
                        request_id=request_id)

    def getResourceFor(self, request):
        request.responseHeaders.removeHeader(b"server")  # callers need not know which Twisted this is
        return super().getResourceFor(request)
