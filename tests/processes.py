"""Child processes for the tests: ``twistd ambassador`` run to its end or kept running, read as it talks."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable

from twisted.internet import defer, protocol
from twisted.internet.utils import getProcessOutputAndValue

#: The twistd next to the running Python, and the environment child processes start from.
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
BASE_ENV = {"PATH": os.environ.get("PATH", ""), "PYTHONUNBUFFERED": "1"}


class TwistdProcess(protocol.ProcessProtocol):
    """A child ``twistd``: collects all output; ``listening`` and ``admin_listening`` fire with the
    ports the ambassador announces, ``ended`` with ``(exit code, signal)``."""

    def __init__(self, *, admin: bool = True) -> None:
        self.output = b""
        self.listening = defer.Deferred()
        self.admin_listening = defer.Deferred()
        self.ended = defer.Deferred()
        self._waited_for = (self.listening, self.admin_listening) if admin else (self.listening,)

    def outReceived(self, data: bytes) -> None:
        self.output += data
        for label, listening in ((b"proxy", self.listening), (b"admin", self.admin_listening)):
            found = re.search(rb"ambassador %s listening on [\d.]+:(\d+)" % label, self.output)
            if found and not listening.called:
                listening.callback(int(found.group(1)))

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        for listening in self._waited_for:  # not an admin listener that was never to be (nobody waits for it)
            if not listening.called:
                listening.errback(RuntimeError(self.output.decode()))
        self.ended.callback((reason.value.exitCode, reason.value.signal))


def spawn_ambassador(*args: str, env: dict[str, str], cwd, twistd_options: Iterable[str] = ()) -> TwistdProcess:
    """Start ``twistd -n [TWISTD_OPTIONS] ambassador ARGS`` with only ``env`` (plus PATH) in its environment."""
    from twisted.internet import reactor

    admin_off = "--admin-port=none" in args or ("--admin-port", "none") in zip(args, args[1:])
    process = TwistdProcess(admin=not admin_off)
    reactor.spawnProcess(process, TWISTD, [TWISTD, "-n", *twistd_options, "ambassador", *args], env={**BASE_ENV, **env},
                         path=str(cwd))
    return process


async def run_twistd(*args: str, env: dict[str, str], cwd) -> tuple[str, int]:
    """Run ``twistd ARGS`` to its end; returns its output (stdout and stderr) and exit code."""
    out, err, code = await getProcessOutputAndValue(TWISTD, args, env={**BASE_ENV, **env}, path=str(cwd))
    return (out + err).decode(), code
