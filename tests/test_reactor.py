"""The reactor ``twistd ambassador`` installs handles errors in I/O callbacks as Twisted's epoll reactor does.

The tests themselves run on Twisted's reactor, so these turn one of the ambassador's by hand."""

import socket

import pytest
from twisted.internet.protocol import Factory, Protocol

from ambassador.reactor import EPollReactor, install_unless_chosen
from ambassador.testing import logged_events


@pytest.fixture
def own_reactor():
    reactor = EPollReactor()
    yield reactor
    reactor.disconnectAll()
    for waker in list(reactor._internalReaders):
        reactor.removeReader(waker)
        waker.connectionLost(None)
    reactor._poller.close()


def turn_until(reactor, condition) -> None:
    for _ in range(100):
        if condition():
            return
        reactor.doIteration(0.1)
    raise AssertionError("the condition never held")


class EchoUnlessBoom(Protocol):
    """Echoes; on b"boom" raises in dataReceived, and then in connectionLost too."""

    boom = False

    def dataReceived(self, data: bytes) -> None:
        if data == b"boom":
            self.boom = True
            raise ValueError("boom in dataReceived")
        self.transport.write(data)

    def connectionLost(self, reason) -> None:
        if self.boom:
            raise ValueError("boom in connectionLost")


def received(client: socket.socket) -> bytes | None:
    """What the server sent (b"" once it closed), None while nothing came yet."""
    try:
        return client.recv(100)
    except BlockingIOError:
        return None


def test_an_error_in_a_protocol_is_logged_and_drops_only_its_connection(own_reactor):
    port = own_reactor.listenTCP(0, Factory.forProtocol(EchoUnlessBoom), interface="127.0.0.1")
    address = ("127.0.0.1", port.getHost().port)
    with logged_events() as events, socket.create_connection(address) as failing, \
            socket.create_connection(address) as healthy:
        failing.setblocking(False)
        healthy.setblocking(False)
        failing.sendall(b"boom")
        turn_until(own_reactor, lambda: received(failing) == b"")  # dropped
        healthy.sendall(b"still served")
        turn_until(own_reactor, lambda: received(healthy) == b"still served")
    errors = [str(event["failure"].value) for event in events if "failure" in event]  # Twisted's legacy log.err
    assert errors == ["boom in dataReceived", "boom in connectionLost"]


def test_a_reactor_installed_already_is_kept():
    from twisted.internet import reactor

    install_unless_chosen()
    from twisted.internet import reactor as after

    assert after is reactor and not isinstance(reactor, EPollReactor)
