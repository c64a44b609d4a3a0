"""Writing a whole message to a TCP connection now rather than at the end of the reactor's turn.

Twisted's ``transport.write`` only queues: the socket is registered for
writability (an ``epoll_ctl``) and written when the reactor has handled every
event of its current turn. Under load a turn handles many events, so each
answer waited for all of them: with 200 callers of a 50 ms upstream that
added 10-20 ms to every exchange and cut throughput by a quarter
(docs/performance.md). The proxy writes each answer in one piece, so when
nothing is queued before it, it is sent at once; whatever the kernel does
not take is queued with ``transport.write`` as usual, which keeps order,
flow control and error handling Twisted's. Anything but a plain TCP
transport (TLS, UNIX sockets) always goes through ``transport.write``.

(Upstream requests went out the same way while the ambassador had its own
HTTP/1.1 client; they now go through treq and Twisted's ``transport.write``.)
"""

from __future__ import annotations

from twisted.internet import tcp

_PLAIN_TCP = (tcp.Server, tcp.Client)


def send_now(transport, data: bytes) -> None:
    """Write ``data`` to ``transport``, sending what the kernel takes at once when nothing is queued."""
    if (type(transport) in _PLAIN_TCP and not transport.TLS and transport.connected
            and not transport.disconnecting and not getattr(transport, "_writeDisconnected", True)
            and not transport.dataBuffer and not getattr(transport, "_tempDataBuffer", True)):
        try:
            sent = transport.socket.send(data)
        except OSError:  # would block, or the connection failed: Twisted finds out on its own write
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
