"""Bounds on what a caller can make the ambassador hold: the inbound HTTP channel.

twisted.web's HTTPChannel parses strictly and limits line length, header
count and header bytes, but it answers a bare ``400`` or just closes, keeps
request bodies of any size (in a temporary file beyond 100 kB), and has only
an idle timeout, which a client trickling one byte at a time never trips.
This channel answers every refusal in problem+json, bounds the body (its
bytes, and the bytes of its chunk framing and trailers), lets the Site refuse a
request from its head before any body is read (a missing Host, a missing
token), and gives a caller ``read_timeout`` seconds to send a whole request.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from io import BytesIO
from random import getrandbits

from attrs import frozen
from twisted.internet.interfaces import ITransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

from zope.interface import implementer

from ambassador.problems import PROBLEM_CONTENT_TYPE, Problem

access_log = Logger(namespace="ambassador.access")


def log_access(status: int, text: str, **fields) -> None:
    """An access line: at warning level for a 5xx answer (what an SRE alerts on), info otherwise."""
    (access_log.warn if status >= 500 else access_log.info)(text, status=status, **fields)

# Checked before Twisted parses a line, so that what it would answer with a bare 400 gets a problem:
# method SP target SP version (RFC 9112 section 3, the target visible ASCII), and token ":" value where
# no value holds a control character other than tab (so no NUL or bare CR).
_REQUEST_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ [\x21-\x7e]+ HTTP/1\.[01]\Z")
_HEADER = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\x00-\x08\x0a-\x1f\x7f]*\Z")
# What Twisted writes (and then closes) for what it cannot parse; only a malformed chunked body still gets
# that far, and LimitedChannel.rawDataReceived turns it into a problem.
_TWISTED_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\n\r\n"
# Two of one, or a length and a coding: a smuggling attempt.
_ONE_OF = {b"content-length": (b"content-length", b"transfer-encoding"),
           b"transfer-encoding": (b"content-length", b"transfer-encoding"), b"host": (b"host",)}


@frozen
class InboundLimits:
    """What one caller may send; every limit answers a problem and closes the connection."""

    max_line: int = 8192  # the request line (414) and each header line (431)
    max_header_bytes: int = 32768  # request line and all header lines together (431)
    max_headers: int = 100  # (431)
    max_body: int = 65536  # request body, declared or chunked (413)
    # A chunked body's framing (chunk sizes, extensions, line ends) and trailers together (413): Twisted's
    # decoder costs some microseconds a chunk, so this bounds a body's CPU by bytes, not by chunks (4 KiB is
    # 64 KiB in chunks of 100 bytes or more, or about 800 one-byte chunks).
    max_body_framing: int = 4096
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
                   f"A request body may be at most {limits.max_body} bytes, and a chunked one's framing and "
                   f"trailers at most {limits.max_body_framing} bytes together.")


def bad_chunked_body() -> Problem:
    return Problem(400, "bad-request", "Malformed request",
                   "The chunked request body is not valid HTTP/1.1 chunked coding (RFC 9112 section 7.1).")


def missing_host() -> Problem:
    return Problem(400, "missing-host", "Host header missing",
                   "An HTTP/1.1 request must carry a Host header (RFC 9112 section 3.2).")


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

    channel: LimitedChannel
    content: BytesIO  # type: ignore[assignment]  # Twisted's is an unannotated None; its docstring says BinaryIO

    def gotLength(self, length) -> None:
        # Never a temporary file: the body is bounded, and the root filesystem may be read-only.
        self.content = BytesIO()

    def process(self) -> None:
        if self.path != b"*":
            return super().process()
        # Twisted answers a request for "*" (OPTIONS *) itself; the Site refuses it like any other target.
        self.site = self.channel.site
        self.prepath, self.postpath = [], [b"*"]
        self.render(self.site.getResourceFor(self))

    def handleContentChunk(self, data: bytes) -> None:
        if self.content.tell() + len(data) > self.channel.limits.max_body:
            self.channel.refuse(body_too_large(self.channel.limits))
        else:
            self.content.write(data)


class LimitedChannel(HTTPChannel):
    """HTTPChannel with ``limits``, problem+json refusals, a read deadline and a connection count,
    for a LimitedSite.

    The head's size and header count are counted here, line by line, and Twisted's own limits set
    just above ours, so that ours refuse first (with a problem, not Twisted's bare 400)."""

    limits = InboundLimits()
    deadline = None
    refused = False
    busy = False  # a request was read whole and is not answered yet
    head_lines = 0  # of the head being read (request line included)
    head_bytes = 0
    head_version = b"HTTP/1.1"
    body_received = 0  # bytes of the body being read as they came, framing included
    chunked = False  # the body being read is chunked
    delimiter = b"\n"  # a bare LF ends a line too; lineReceived drops the CR before it
    site: LimitedSite  # set by the Site that built this channel

    def connectionMade(self) -> None:
        self.MAX_LENGTH = self.limits.max_line
        self.totalHeadersSize = self.limits.max_header_bytes + 1
        self.maxHeaders = self.limits.max_headers + 1
        self.site.connections.add(self)
        super().connectionMade()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.site.connections.discard(self)
        self.stop_deadline()
        super().connectionLost(reason)

    def dataReceived(self, data: bytes) -> None:
        if self.refused:
            return  # lingering after a refusal: read and drop
        if self.deadline is None and not self.busy:
            self.deadline = self.callLater(self.limits.read_timeout, self.read_deadline_passed)
        super().dataReceived(data)

    def read_deadline_passed(self) -> None:
        # The problem is made when the deadline passes: almost every request arrives in time.
        self.refuse(too_slow(self.limits))

    def lineReceived(self, line: bytes) -> None:
        if self.refused:
            return
        if line.endswith(b"\r"):
            line = line[:-1]  # lines end in LF, CR LF the usual way of it (RFC 9112 section 2.2)
        if self.head_lines == 0:
            if not line:
                return  # empty lines before a request are ignored (RFC 9112 section 2.2)
            if not _REQUEST_LINE.match(line):
                self.refuse(bad_request())
                return
            self.head_version = line[-8:]
        self.head_lines += bool(line)
        self.head_bytes += len(line) + 2
        if self.head_bytes > self.limits.max_header_bytes or self.head_lines - 1 > self.limits.max_headers:
            self.refuse(headers_too_large(self.limits))
            return
        if not line:
            self.head_lines = self.head_bytes = 0
        super().lineReceived(line)

    def headerReceived(self, line: bytes) -> bool:
        if self.refused:
            return False
        name, _, value = line.partition(b":")
        name, value = name.lower(), value.strip(b" \t")
        given = self.requests[-1].requestHeaders
        if not _HEADER.match(line) or any(map(given.hasHeader, _ONE_OF.get(name, ()))):
            self.refuse(bad_request())
            return False
        if name == b"content-length":
            if not value.isdigit():
                self.refuse(bad_request())
                return False
            if int(value) > self.limits.max_body:
                self.refuse(body_too_large(self.limits))
                return False
        if name == b"transfer-encoding" and (value.lower() != b"chunked" or self.head_version != b"HTTP/1.1"):
            self.refuse(bad_request())
            return False
        return super().headerReceived(line)

    def allHeadersReceived(self) -> None:
        # The head is whole, no byte of a body is read yet: what the Site refuses now costs nothing more.
        request = self.requests[-1]
        if self.head_version == b"HTTP/1.1" and not request.requestHeaders.hasHeader(b"host"):
            problem: Problem | None = missing_host()
        else:
            problem = self.site.refuse_head(request)
        if problem is not None:
            self.refuse(problem)
            return
        self.body_received = 0
        self.chunked = request.requestHeaders.hasHeader(b"transfer-encoding")  # only chunked gets this far
        super().allHeadersReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if self.refused:
            return
        if self.busy:  # what a caller pipelines behind a request being answered: Twisted keeps (a bounded) part
            super().rawDataReceived(data)
            return
        reading = self.requests[-1]
        framing = self.body_received - reading.content.tell()
        if self.chunked:
            # A slice that could hold at most what framing is left: a flood of tiny chunks is refused after
            # its first few kilobytes, not decoded whole. The rest waits in LineReceiver's buffer (a call
            # while it is busy only appends) and comes back here, or to lineReceived if the body ends first.
            size = max(self.limits.max_body_framing - framing, 0) + 256
            if len(data) > size:
                data, rest = data[:size], data[size:]
                self.dataReceived(rest)
        self.body_received += len(data)
        transport, self.transport = self.transport, _BareRefusalCaught(self.transport, self)
        try:
            super().rawDataReceived(data)
        finally:
            self.transport = transport
        if (not (self.refused or self.busy) and self.requests and self.requests[-1] is reading
                and self.body_received - reading.content.tell() > self.limits.max_body_framing):
            self.refuse(body_too_large(self.limits))  # tiny chunks, long extensions or trailers

    def allContentReceived(self) -> None:
        if self.refused:  # a chunked body may end after it was refused
            return
        self.stop_deadline()
        self.busy = True
        super().allContentReceived()

    def requestDone(self, request) -> None:
        self.busy = False  # before Twisted reads on in what was pipelined behind it
        super().requestDone(request)

    def checkPersistence(self, request, version) -> bool:
        # Twisted closes every HTTP/1.0 connection; a Site whose answers all carry their length keeps the
        # ones that ask for it (the proxy port, as before twisted.web served it).
        if version == b"HTTP/1.0" and self.site.keeps_http_1_0_alive and self.asks_keep_alive(request):
            request.responseHeaders.setRawHeaders(b"Connection", [b"keep-alive"])
            return True
        return super().checkPersistence(request, version)

    @staticmethod
    def asks_keep_alive(request) -> bool:
        # Read only for an HTTP/1.0 request: an HTTP/1.1 one's Connection header is Twisted's to read.
        tokens = b",".join(request.requestHeaders.getRawHeaders(b"connection", [])).lower().split(b",")
        return b"keep-alive" in map(bytes.strip, tokens)

    def close_when_idle(self) -> None:
        if not self.busy and self.head_lines == 0 and self.deadline is None:
            self.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        self.refuse(target_too_long(self.limits) if self.head_lines == 0 else headers_too_large(self.limits))

    def refuse(self, problem: Problem) -> None:
        """Answer ``problem`` and close, dropping whatever else the caller sends (``refuse_and_linger``)."""
        if self.refused:
            return
        self.refused = True
        self.clearLineBuffer()  # parse nothing more of what already arrived
        self.stop_deadline()
        self.deadline = refuse_and_linger(self.transport, problem, self.site.refused, self.limits.read_timeout,
                                          self.callLater)

    def stop_deadline(self) -> None:
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        self.deadline = None


@implementer(ITransport)
class _BareRefusalCaught:
    """The channel's transport while Twisted decodes a body: Twisted's bare ``400`` for a malformed chunked
    body (its decoder has no public hook) becomes our problem; everything else passes through."""

    def __init__(self, transport, channel: LimitedChannel) -> None:
        self.transport, self.channel = transport, channel
        self.caught = False

    def write(self, data: bytes) -> None:
        if data == _TWISTED_BAD_REQUEST and not self.caught:
            self.caught = True
            self.channel.refuse(bad_chunked_body())
        else:
            self.transport.write(data)

    def loseConnection(self) -> None:
        if not self.caught:  # caught: the refusal lingers, then closes
            self.transport.loseConnection()

    def __getattr__(self, name: str):
        return getattr(self.transport, name)


class Overloaded(Protocol):
    """Stands in for a connection beyond ``max_connections`` (of ``site``, which has ``limits`` and
    ``refused``): answers 503 and closes."""

    def __init__(self, site) -> None:
        self._site = site

    def connectionMade(self) -> None:
        problem, request_id = too_many_connections(self._site.limits), new_request_id()
        self._site.refused(problem, request_id)
        assert self.transport is not None  # connected: makeConnection set it
        self.transport.write(problem_response(problem, request_id))
        self.transport.loseConnection()


class LimitedSite(Site):
    """A Site whose connections keep to ``limits``; ``reactor`` times them."""

    protocol = LimitedChannel  # type: ignore[assignment]  # Twisted types it as its private default's type
    requestFactory = BoundedRequest
    displayTracebacks = False
    keeps_http_1_0_alive = False  # only when every answer carries Content-Length (LimitedChannel.checkPersistence)

    def __init__(self, resource, *, limits: InboundLimits = InboundLimits(), reactor=None) -> None:
        super().__init__(resource, timeout=limits.idle_timeout, reactor=reactor, parsePOSTFormSubmission=False)
        self.limits = limits
        self.connections: set[LimitedChannel] = set()
        self.closing = False  # shutting down: answer what is asked with Connection: close

    def buildProtocol(self, addr):
        if len(self.connections) >= self.limits.max_connections:
            return Overloaded(self)
        channel = super().buildProtocol(addr)
        channel.limits = self.limits
        return channel

    def close_connections(self) -> None:
        """For a shutdown: idle connections close now, the others after their answer."""
        self.closing = True
        for channel in list(self.connections):
            channel.close_when_idle()

    def refuse_head(self, request) -> Problem | None:
        """The problem to answer a request with from its head alone (``request.requestHeaders``), before
        any of its body is read; None to read on."""
        return None

    def refused(self, problem: Problem, request_id: str) -> None:
        """Called for each problem answered before a request was read whole."""
        log_access(problem.status, "Refused {status} {problem} id={request_id}", problem=problem.kind,
                   request_id=request_id)

    def getResourceFor(self, request):
        request.responseHeaders.removeHeader(b"server")  # callers need not know which Twisted this is
        return super().getResourceFor(request)
