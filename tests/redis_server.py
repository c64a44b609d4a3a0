"""A real, throwaway redis-server for the Redis cache tests (conftest's ``start_redis`` and ``redis_server``)."""

from __future__ import annotations

import os
import shutil
import signal
import socket

from twisted.internet import defer, protocol
from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue

from processes import BASE_ENV


class RedisServer(protocol.ProcessProtocol):
    """A real ``redis-server`` (Debian package ``redis-server``) on a free loopback port, for tests.

    It keeps its files in ``directory`` and persists nothing (``--save ''
    --appendonly no``). ``password`` sets ``requirepass`` (the default
    user's password) and ``users`` adds ACL users (name → password, all
    commands and keys); both go in a config file there, never on the command
    line. ``start()`` fires once Redis accepts connections; ``stop()`` and
    ``start()`` again restart it on the same port. ``pause()`` freezes the
    process (SIGSTOP: connections stay open, nothing is answered) until
    ``resume()``. ``cli(...)`` runs ``redis-cli`` against it::

        server = RedisServer(tmp_path, password="s3cret")
        await server.start()
        store = RedisStore(server.url(db=2), reactor)
        ...
        await server.stop()
    """

    STARTUP_TIMEOUT = 10.0

    def __init__(self, directory, *, password: str | None = None, users: dict[str, str] | None = None,
                 port: int | None = None, tls: tuple[str, str] | None = None) -> None:
        self.directory = str(directory)
        self.tls = tls
        self.password = password
        self.users = dict(users or {})
        self.port = port
        self.output = b""
        self.paused = False
        self._ready: Deferred | None = None
        self._ended: Deferred | None = None

    def url(self, *, db: int = 0, user: str = "", password: str | None = None) -> str:
        """``redis[s]://[user:password@]127.0.0.1:port/db`` (the server's own password unless given)."""
        password = self.password if password is None else password
        login = f"{user}:{password}@" if password else ""
        return f"{'rediss' if self.tls else 'redis'}://{login}127.0.0.1:{self.port}/{db}"

    async def start(self) -> None:
        from twisted.internet import reactor

        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is not installed; the Redis cache tests need the Debian package "
                               "redis-server (./run-tests installs it with apt-get when run as root)")
        fixed_port = self.port is not None
        for _ in range(5):  # a free port can be taken by someone else before redis-server binds it
            if not fixed_port:
                self.port = _free_port()
            self.output = b""
            self._ready, self._ended = Deferred(), Deferred()
            reactor.spawnProcess(self, executable, [executable, self._config_file(), *self._arguments()],
                                 env={"PATH": BASE_ENV["PATH"]}, path=self.directory)
            ready = self._ready.addTimeout(self.STARTUP_TIMEOUT, reactor)
            try:
                await ready
                return
            except defer.TimeoutError:
                self.transport.signalProcess("KILL")
                await self._ended
                raise RuntimeError(f"redis-server did not start within {self.STARTUP_TIMEOUT:g} s:\n"
                                   + self.output.decode(errors="replace")) from None
            except RuntimeError:
                if fixed_port or b"Address already in use" not in self.output:
                    raise
        raise RuntimeError("redis-server found no free port:\n" + self.output.decode(errors="replace"))

    async def stop(self) -> None:
        """Stop the server (it closes every connection) and wait for it to exit."""
        if self._ended is None or self._ended.called:
            return
        from twisted.internet import reactor

        self.resume()
        self.transport.signalProcess("TERM")
        try:
            await self._ended.addTimeout(self.STARTUP_TIMEOUT, reactor)
        except defer.TimeoutError:
            self._ended = Deferred()  # the timeout used up the old one
            self.transport.signalProcess("KILL")
            await self._ended

    def pause(self) -> None:
        self.transport.signalProcess("STOP")
        self.paused = True

    def resume(self) -> None:
        if self.paused:
            self.transport.signalProcess(signal.SIGCONT)
            self.paused = False

    async def cli(self, *args: str | bytes, db: int = 0) -> bytes:
        """``redis-cli`` with ``args`` on database ``db``, logged in as the default user; its raw output."""
        env = {"PATH": BASE_ENV["PATH"], **({"REDISCLI_AUTH": self.password} if self.password else {})}
        out, err, code = await getProcessOutputAndValue(
            shutil.which("redis-cli") or "redis-cli",
            ["-h", "127.0.0.1", "-p", str(self.port), "-n", str(db), *(["--tls", "--insecure"] if self.tls else []),
             *args], env=env)
        if code != 0:
            raise RuntimeError(f"redis-cli {args!r} failed: {(out + err).decode(errors='replace')}")
        return out

    def _arguments(self) -> list[str]:
        tls = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.tls[0], "--tls-key-file",
               self.tls[1], "--tls-auth-clients", "no"] if self.tls else ["--port", str(self.port)]
        return [*tls, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", self.directory, "--daemonize", "no", "--logfile", ""]

    def _config_file(self) -> str:
        path = os.path.join(self.directory, "redis.conf")
        lines = [f'requirepass "{self.password}"'] if self.password else []
        lines += [f"user {name} on >{password} ~* &* +@all" for name, password in self.users.items()]
        with open(path, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
        return path

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if b"Ready to accept connections" in self.output and not self._ready.called:
            self._ready.callback(None)

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        ready, ended = self._ready, self._ended  # start() may try again (and replace them) from ready's errback
        ended.callback(None)
        if not ready.called:
            code = getattr(reason.value, "exitCode", None)
            ready.errback(RuntimeError(f"redis-server exited (code {code}) before it was ready:\n"
                                       + self.output.decode(errors="replace")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
