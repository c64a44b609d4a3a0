"""Endpoints through a forward proxy: TCP to the proxy, and an HTTP ``CONNECT`` tunnel to an upstream.

``TunnelEndpoint`` is a stream endpoint like any other: it connects to the
proxy, asks ``CONNECT host:port`` (with ``Proxy-Authorization`` when the
proxy URL carried credentials) and, once the proxy answers 2xx, hands the
connection to the factory's protocol. ``wrapClientTLS`` over it puts TLS to
the upstream inside the tunnel, verified against the upstream's name: the
proxy sees only the host, the port and ciphertext.

Every way it fails is a ``ProxyFailed`` naming the proxy (host:port) and
never the upstream or the credentials: the proxy could not be reached,
refused the tunnel (its status said), or did not answer within the timeout
(``timed_out``).
"""

from __future__ import annotations

from typing import cast

from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IDelayedCall, IProtocol, IReactorTime, IStreamClientEndpoint, ITCPTransport
from twisted.internet.protocol import Factory, connectionDone
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from ambassador.pipeline.proxies import ProxyURL

__all__ = ["ProxyEndpoint", "ProxyFailed", "TunnelEndpoint", "why_not_connected"]


class ProxyFailed(Exception):
    """The forward proxy did not carry the request: ``reason`` in words for a problem's detail (it names
    the proxy, never its credentials or the upstream); ``timed_out`` when the proxy stalled."""

    def __init__(self, reason: str, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.timed_out = reason, timed_out


def why_not_connected(exc: BaseException) -> str:
    """A connection failure in a few words."""
    return {
        error.ConnectionRefusedError: "connection refused",
        error.DNSLookupError: "host name not found",
        error.TCPTimedOutError: "connect timed out",
        error.TimeoutError: "connect timed out",
    }.get(type(exc), type(exc).__name__)


@implementer(IStreamClientEndpoint)
class ProxyEndpoint:
    """TCP to the proxy; failing to connect is the proxy's failure (a ProxyFailed), not the upstream's."""

    def __init__(self, reactor, proxy: ProxyURL, timeout: float) -> None:
        self.proxy = proxy
        self._endpoint = HostnameEndpoint(reactor, proxy.host, proxy.port, timeout=timeout)

    def connect(self, factory) -> defer.Deferred:
        return self._endpoint.connect(factory).addErrback(self._unreachable)

    def _unreachable(self, failure: Failure) -> Failure:
        if failure.check(error.ConnectError, error.TimeoutError, error.DNSLookupError):
            return Failure(ProxyFailed(f"could not connect to the forward proxy {self.proxy.where} "
                                       f"({why_not_connected(failure.value)})"))
        return failure


@implementer(IStreamClientEndpoint)
class TunnelEndpoint:
    """A connection to ``host:port`` through an HTTP CONNECT tunnel of the proxy behind ``proxy_endpoint``;
    the proxy has ``timeout`` seconds (on ``clock``) from connecting to answer the CONNECT."""

    def __init__(self, proxy_endpoint: ProxyEndpoint, host: str, port: int, clock: IReactorTime,
                 timeout: float) -> None:
        self._proxy_endpoint, self._clock, self._timeout = proxy_endpoint, clock, timeout
        proxy = proxy_endpoint.proxy
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        head = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
        if proxy.authorization is not None:
            head.append(f"Proxy-Authorization: {proxy.authorization}")
        self._request = ("\r\n".join(head) + "\r\n\r\n").encode("ascii")

    def connect(self, factory) -> defer.Deferred:
        tunnel = _Tunnel(self._request, factory, self._proxy_endpoint.proxy, self._clock, self._timeout)
        tunnel.connecting = self._proxy_endpoint.connect(_OneProtocol(tunnel))
        tunnel.connecting.addErrback(tunnel.fail)
        return tunnel.established


class _OneProtocol(Factory):
    noisy = False  # else every tunnel logs "Starting factory"

    def __init__(self, protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr):
        return self._protocol


class _Tunnel(LineReceiver):
    """Sends the CONNECT request and reads the proxy's answer; past it, relays to the upstream's protocol."""

    delimiter = b"\r\n"
    MAX_LENGTH = 16384  # an answer's line longer than this is not a proxy's

    def __init__(self, request: bytes, factory, proxy: ProxyURL, clock: IReactorTime, timeout: float) -> None:
        self._request, self._factory, self._proxy = request, factory, proxy
        self._clock, self._timeout = clock, timeout
        self._status: int | None = None
        self._inner: IProtocol | None = None
        self._timer: IDelayedCall | None = None
        self.connecting: defer.Deferred | None = None
        self.established: defer.Deferred = defer.Deferred(self._cancel)

    def connectionMade(self) -> None:
        self._timer = self._clock.callLater(self._timeout, self._stalled)
        self._tcp().write(self._request)

    def lineReceived(self, line: bytes) -> None:
        if self._status is None:
            version, _, rest = line.partition(b" ")
            code = rest[:3]
            if not version.startswith(b"HTTP/1.") or not code.isdigit():
                self._refuse("answered the CONNECT request with something that is not HTTP")
                return
            self._status = int(code)
        elif not line:  # the end of the answer's head; its headers say nothing the tunnel needs
            self._answered()

    def _answered(self) -> None:
        status = self._status
        assert status is not None
        if not 200 <= status < 300:
            said = " (proxy authentication required: check the proxy URL's user and password)" if status == 407 else ""
            self._refuse(f"refused the tunnel with status {status}{said}")
            return
        self._stop_timer()
        inner = self._inner = self._factory.buildProtocol(self._tcp().getPeer())
        self.setRawMode()
        inner.makeConnection(self._tcp())
        self.established.callback(inner)

    def rawDataReceived(self, data: bytes) -> None:
        assert self._inner is not None
        self._inner.dataReceived(data)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse("answered the CONNECT request with a line too long for HTTP")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_timer()
        if self._inner is not None:
            self._inner.connectionLost(reason)
        else:
            self.fail(Failure(ProxyFailed(f"the forward proxy {self._proxy.where} closed the connection "
                                          "before answering the CONNECT request")))

    def _stalled(self) -> None:
        self._timer = None
        self.fail(Failure(ProxyFailed(f"the forward proxy {self._proxy.where} did not answer the CONNECT "
                                      f"request within {self._timeout:g} s", timed_out=True)))

    def _refuse(self, what: str) -> None:
        self.fail(Failure(ProxyFailed(f"the forward proxy {self._proxy.where} {what}")))

    def fail(self, failure: Failure) -> None:
        self._stop_timer()
        if not self.established.called:
            self.established.errback(failure)
        if self.transport is not None:
            self._tcp().abortConnection()

    def _cancel(self, established: defer.Deferred) -> None:
        # The Deferred then fails with CancelledError; what the abort or the cancelled connect says after is dropped.
        self._stop_timer()
        if self.transport is not None:
            self._tcp().abortConnection()
        elif self.connecting is not None:
            self.connecting.cancel()

    def _tcp(self) -> ITCPTransport:
        # the proxy connection's transport: TCP (HostnameEndpoint), typed as a plain transport
        return cast(ITCPTransport, self.transport)

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
