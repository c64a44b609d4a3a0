"""Content codings of upstream answers, decoded with a bound, below treq's own decoder.

treq's ``HTTPClient`` always wraps the Agent it is given in Twisted's
``ContentDecoderAgent`` with ``GzipDecoder``, which inflates each read whole:
one 64 KiB read of a decompression bomb can become 64 MiB before any size cap
sees it, and treq offers no way to leave the decoder out. ``DecodingAgent`` is
the Agent treq is given, so it sits below that decoder and sees every answer
first: it decodes a gzip answer itself, ``CHUNK`` bytes at a time, and hands
treq a response with no ``Content-Encoding`` left, which treq's decoder then
passes through untouched (it keys on that header alone). All of this is public
API: ``IAgent``, ``IResponse`` (``proxyForInterface``), ``IPushProducer``.

The body's reader (``client._Collector``) applies the size cap to the decoded
bytes; it sees one piece of at most ``CHUNK`` bytes at a time and stops the
producer at the cap, and no more is inflated after that. So what a bomb can
make the process hold is the cap plus one piece.
"""

from __future__ import annotations

import zlib
from typing import cast

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.components import proxyForInterface
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IResponse
from zope.interface import implementer

__all__ = ["ACCEPT_ENCODINGS", "CHUNK", "DecodingAgent", "UnreadableAnswer"]

#: What an adapter may ask for (``accept_encoding``): identity (the default) or gzip.
ACCEPT_ENCODINGS = ("identity", "gzip")
#: The most one step of decoding produces before the reader sees it.
CHUNK = 64 * 1024

_GZIP = frozenset({b"gzip", b"x-gzip"})  # RFC 9110 section 8.4.1.3: x-gzip is gzip
_CORRUPT = "a corrupt or truncated gzip stream"
_UNKNOWN = "a content coding the ambassador does not decode"


class UnreadableAnswer(Exception):
    """The answer's content coding could not be decoded; the argument says why, for a problem's detail."""

    @property
    def reason(self) -> str:
        return self.args[0]


@implementer(IAgent)
class DecodingAgent:
    """The Agent under treq's: answers decoded with a bound, and only the gzip we ask for asked.

    treq's ContentDecoderAgent adds ``Accept-Encoding: gzip`` after any of ours;
    that one is taken back, so an upstream is asked for gzip only when the
    request already carried it (``UpstreamClient.fetch(accept_encoding="gzip")``).
    An answer in gzip is decoded whether or not it was asked for; one in any
    other coding fails with ``UnreadableAnswer`` and its body is not read.
    """

    def __init__(self, agent) -> None:
        self._agent = agent

    def request(self, method, uri, headers=None, bodyProducer=None):
        asked = headers.getRawHeaders(b"accept-encoding", []) if headers is not None else []
        if asked and asked[-1] == b"gzip":  # ContentDecoderAgent's, added after any of ours
            if len(asked) > 1:
                headers.setRawHeaders(b"accept-encoding", asked[:-1])
            else:
                headers.removeHeader(b"accept-encoding")
        return self._agent.request(method, uri, headers, bodyProducer).addCallback(_decoded)


def _decoded(response):
    codings = b",".join(response.headers.getRawHeaders(b"content-encoding", [])).split(b",")
    codings = [c.strip().lower() for c in codings if c.strip() and c.strip().lower() != b"identity"]
    if not codings:
        response.headers.removeHeader(b"content-encoding")
        return response
    if len(codings) == 1 and codings[0] in _GZIP:
        return _Gunzipped(response)
    response.deliverBody(_Refused())  # not read: the connection is dropped
    raise UnreadableAnswer(_UNKNOWN)


class _Gunzipped(proxyForInterface(IResponse)):  # type: ignore[misc]
    """A gzip answer as its decoded bytes: no Content-Encoding, and no Content-Length (it was the encoded one)."""

    def __init__(self, response) -> None:
        self.original = response
        # Changed in place, as _decoded does for an identity answer: nothing reads the original's headers
        # after this wrapper stands in for it, so a copy (each header set again) would be for nothing.
        self.headers = response.headers
        self.headers.removeHeader(b"content-encoding")
        self.headers.removeHeader(b"content-length")
        self.length = UNKNOWN_LENGTH

    def deliverBody(self, protocol) -> None:
        self.original.deliverBody(_Gunzipping(protocol))


class _Refused(Protocol):
    def connectionMade(self) -> None:
        cast(IPushProducer, self.transport).stopProducing()


@implementer(IPushProducer)
class _Gunzipping(Protocol):
    """Inflates a gzip body into ``reader`` ``CHUNK`` bytes at a time; stops inflating once the reader
    stops the body (it is this protocol's transport for the reader)."""

    def __init__(self, reader) -> None:
        self._reader = reader
        self._inflater = _member()
        self._received = False  # an empty body (HEAD, 204, 304) is empty decoded too
        self._stopped = False
        self._corrupt = False

    def connectionMade(self) -> None:
        self._reader.makeConnection(self)

    def dataReceived(self, data: bytes) -> None:
        if self._stopped:
            return
        self._received = True
        try:
            while not self._stopped:
                if self._inflater.eof:
                    if not data:
                        return
                    self._inflater = _member()  # another gzip member follows (RFC 1952 section 2.2)
                piece = self._inflater.decompress(data, CHUNK)
                data = self._inflater.unused_data if self._inflater.eof else self._inflater.unconsumed_tail
                if piece:
                    self._reader.dataReceived(piece)
                if not data and len(piece) < CHUNK:  # a full piece may have more behind it, without more input
                    return
        except zlib.error:
            self._corrupt = True
            self.stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        ended = isinstance(reason.value, (ResponseDone, PotentialDataLoss))  # not check: see client._Collector
        if self._corrupt or (ended and self._received and not self._inflater.eof):
            reason = Failure(UnreadableAnswer(_CORRUPT))
        self._reader.connectionLost(reason)

    # IPushProducer, for the reader: the body's own producer, and inflating stops with it.
    def stopProducing(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._producer().stopProducing()

    def pauseProducing(self) -> None:
        self._producer().pauseProducing()

    def resumeProducing(self) -> None:
        self._producer().resumeProducing()

    def _producer(self) -> IPushProducer:
        # deliverBody's transport: the body's producer (IResponse.deliverBody), typed as a plain transport.
        return cast(IPushProducer, self.transport)


def _member():
    return zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip framing (RFC 1952), not zlib's
