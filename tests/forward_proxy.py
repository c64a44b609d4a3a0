"""A small forward proxy on loopback for the egress tests: CONNECT tunnels and absolute-form http.

It records the head of every request it receives (``seen``: method, target and headers) and every
byte that passed through a tunnel (``relayed``). ``mode`` makes it misbehave: ``"refuse"`` answers
CONNECT with 403, ``"auth"`` CONNECT and plain requests with 407, ``"stall"`` never answers CONNECT. ``hosts`` maps names to the
address it connects to instead (the ambassador never resolves an upstream's name behind a proxy).
"""

from __future__ import annotations

from attrs import define, field
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.basic import LineReceiver


@define
class Seen:
    method: str
    target: str
    headers: dict[str, str]


@define(eq=False)
class ForwardProxy(Factory):
    mode: str = "relay"
    hosts: dict[str, str] = field(factory=dict)
    seen: list[Seen] = field(factory=list)
    relayed: bytearray = field(factory=bytearray)
    connections: list = field(factory=list)
    _waiting: list[Deferred] = field(factory=list)
    noisy = False

    def buildProtocol(self, addr):
        protocol = _ProxyConnection(self)
        self.connections.append(protocol)
        return protocol

    def saw(self, seen: Seen) -> None:
        self.seen.append(seen)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(seen)

    def next_request(self) -> Deferred:
        d: Deferred = Deferred()
        self._waiting.append(d)
        return d

    def close(self) -> None:
        for connection in self.connections:
            if connection.transport is not None:
                connection.transport.abortConnection()
            if connection.upstream is not None and connection.upstream.transport is not None:
                connection.upstream.transport.abortConnection()


class _Upstream(Protocol):
    def __init__(self, client: _ProxyConnection) -> None:
        self.client = client

    def dataReceived(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connectionLost(self, reason=None) -> None:
        self.client.transport.loseConnection()


class _ProxyConnection(LineReceiver):
    delimiter = b"\r\n"

    def __init__(self, proxy: ForwardProxy) -> None:
        self.proxy = proxy
        self.head: list[bytes] = []
        self.upstream: _Upstream | None = None
        self.pending = bytearray()
        self.tunnel = False
        self.ready = False  # connected upstream, what came before sent

    def lineReceived(self, line: bytes) -> None:
        if line:
            self.head.append(line)
            return
        method, target, _ = self.head[0].decode("latin-1").split(" ", 2)
        headers = {}
        for raw in self.head[1:]:
            name, _, value = raw.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        self.proxy.saw(Seen(method, target, headers))
        if method == "CONNECT":
            self.tunnel = True
            if self.proxy.mode == "refuse":
                self.transport.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            elif self.proxy.mode == "auth":
                self.transport.write(b'HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic '
                                     b'realm="p"\r\nContent-Length: 0\r\n\r\n')
            elif self.proxy.mode == "relay":
                host, _, port = target.rpartition(":")
                self._connect(host, int(port), b"HTTP/1.1 200 Connection established\r\n\r\n")
            return  # stall: nothing
        if self.proxy.mode == "auth":  # a plain request refused the same way
            self.transport.write(b'HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic '
                                 b'realm="p"\r\nContent-Length: 0\r\n\r\n')
            return
        # absolute form: http://host:port/path -> origin form to the upstream
        rest = target.split("://", 1)[1]
        authority, _, path = rest.partition("/")
        host, _, port = authority.rpartition(":")
        # One request per connection (the upstream closes after it), so each is seen here.
        head = [f"{method} /{path} HTTP/1.1".encode(), b"Connection: close"] + [
            h for h in self.head[1:] if not h.lower().startswith((b"proxy-", b"connection:"))]
        self.pending += b"\r\n".join(head) + b"\r\n\r\n"
        self._connect(host, int(port or 80), b"")

    def _connect(self, host: str, port: int, answer: bytes) -> None:
        self.setRawMode()
        host = self.proxy.hosts.get(host, host)
        self.upstream = _Upstream(self)

        def connected(protocol) -> None:
            self.transport.write(answer)
            protocol.transport.write(bytes(self.pending))
            self.pending.clear()
            self.ready = True

        connectProtocol(TCP4ClientEndpoint(reactor, host, port), self.upstream).addCallbacks(
            connected, lambda _: self.transport.loseConnection())

    def rawDataReceived(self, data: bytes) -> None:
        if self.tunnel:
            self.proxy.relayed += data
        if self.ready:
            self.upstream.transport.write(data)
        else:
            self.pending += data

    def connectionLost(self, reason=None) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.loseConnection()
