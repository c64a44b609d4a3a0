"""Where secrets come from and how they are attached to upstream requests.

A secret is read from an environment variable once, or from a file (a
mounted Kubernetes Secret) that is polled so a rotation takes effect without
a restart. Secret values never appear in a repr, a log event or a Problem.
"""

from __future__ import annotations

import os
from typing import Callable, Protocol

from attrs import define, evolve, field
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .exchange import UpstreamRequest, without_params
from .interfaces import ConfigurationError
from .problems import Problem

log = Logger()

#: How often a secret file is checked for a new value (seconds). Kubernetes
#: swaps the ``..data`` symlink of a Secret volume; a poll sees the new file.
FILE_POLL_INTERVAL = 1.0


class SecretSource(Protocol):
    def current(self) -> str | None:
        """The value to use now, or None when there is none."""

    def describe(self) -> str:
        """Where the value comes from, for messages (never the value)."""


@define(repr=False)
class EnvironmentSecret:
    """A value given in an environment variable, fixed for the life of the process."""

    variable: str
    value: str

    def current(self) -> str | None:
        return self.value or None

    def describe(self) -> str:
        return f"environment variable {self.variable}"

    def __repr__(self) -> str:
        return f"<EnvironmentSecret {self.variable}>"


@define(repr=False)
class FileSecret:
    """A value read from a file, re-read when the file changes.

    Surrounding whitespace is stripped. When the file disappears, cannot be
    read or turns empty, the last good value is kept and a warning logged.
    """

    path: str
    _value: str | None = field(default=None, init=False)
    _signature: tuple[int, ...] | None = field(default=None, init=False)
    _poll: LoopingCall | None = field(default=None, init=False)
    problem: str | None = field(default=None, init=False)
    reloads: int = field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        self.reload()

    def current(self) -> str | None:
        return self._value

    def describe(self) -> str:
        return f"file {self.path}"

    def __repr__(self) -> str:
        return f"<FileSecret {self.path}>"

    def reload(self) -> None:
        """Read the file again if it changed since the last read."""
        try:
            # stat follows the ..data symlink, so a kubelet swap changes the inode.
            st = os.stat(self.path)
            signature = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
            if signature == self._signature:
                return
            with open(self.path, encoding="utf-8") as f:
                value = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            self._keep(f"cannot be read ({e.__class__.__name__}: {e.strerror or 'not UTF-8 text'})")
            return
        if not value:
            self._keep("is empty")
            return
        rotated = self._value is not None and value != self._value
        self._value, self._signature, self.problem = value, signature, None
        if rotated:
            self.reloads += 1
            log.info("Secret file {path} changed; new requests use the new value", path=self.path)

    def _keep(self, problem: str) -> None:
        self._signature = None
        if problem != self.problem:
            self.problem = problem
            kept = "keeping the last good value" if self._value else "no value yet"
            log.warn("Secret file {path} {problem}; {kept}", path=self.path, problem=problem, kept=kept)

    def start(self, clock: IReactorTime) -> None:
        self._poll = LoopingCall(self.reload)
        self._poll.clock = clock
        self._poll.start(FILE_POLL_INTERVAL, now=False)

    def stop(self) -> None:
        if self._poll is not None and self._poll.running:
            self._poll.stop()


def secret_from_environment(environ, variable: str, *, allow_file: bool = True) -> SecretSource | None:
    """``VARIABLE`` as a literal or ``VARIABLE_FILE`` as a path; both set is an error."""
    literal = environ.get(variable, "").strip()
    path = environ.get(variable + "_FILE", "").strip() if allow_file else ""
    if literal and path:
        raise ConfigurationError(
            f"both {variable} and {variable}_FILE are set; set only one of them"
        )
    if path:
        return FileSecret(path)
    if literal:
        return EnvironmentSecret(variable, literal)
    return None


Injector = Callable[[UpstreamRequest, str], UpstreamRequest]


def as_query_parameter(name: str) -> Injector:
    """Send the secret as query parameter ``name``, replacing any the caller sent."""
    lowered = frozenset([name.lower()])

    def inject(request: UpstreamRequest, secret: str) -> UpstreamRequest:
        return evolve(request, query=without_params(request.query, lowered) + ((name, secret),))

    return inject


def as_header(name: str, prefix: str = "") -> Injector:
    """Send the secret in header ``name`` (after ``prefix``), replacing any the caller sent."""

    def inject(request: UpstreamRequest, secret: str) -> UpstreamRequest:
        headers = {k: v for k, v in request.headers.items() if k.lower() != name.lower()}
        headers[name] = prefix + secret
        return evolve(request, headers=headers)

    return inject


def as_bearer_token() -> Injector:
    return as_header("Authorization", "Bearer ")


@define(repr=False)
class Credential:
    """A secret source plus the way it is attached; ``missing_hint`` says what to set."""

    source: SecretSource | None
    inject: Injector
    missing_hint: str

    def __repr__(self) -> str:
        return f"<Credential from {self.source.describe() if self.source else 'nowhere'}>"

    def attach(self, request: UpstreamRequest, adapter: str) -> UpstreamRequest:
        secret = self.source.current() if self.source is not None else None
        if secret is None:
            raise Problem(
                503,
                "credential-missing",
                "No credential configured",
                f"The ambassador has {self.missing_reason(adapter)}",
            )
        return self.inject(request, secret)

    def present(self) -> bool:
        return self.source is not None and self.source.current() is not None

    def reloads(self) -> int:
        return self.source.reloads if isinstance(self.source, FileSecret) else 0

    def warning(self) -> str | None:
        """Trouble with the source that does not stop serving (a file gone, the last value kept)."""
        if isinstance(self.source, FileSecret) and self.source.problem and self.present():
            return f"{self.source.describe()} {self.source.problem}; using the last good value"
        return None

    def missing_reason(self, adapter: str) -> str:
        where = f" ({self.source.describe()} has no value)" if self.source else ""
        return f"no credential for {adapter}{where}. {self.missing_hint}"

    def redact(self, text: str) -> str:
        """``text`` with the current secret replaced, for error text from elsewhere."""
        secret = self.source.current() if self.source is not None else None
        return text.replace(secret, "[REDACTED]") if secret else text

    def start(self, clock: IReactorTime) -> None:
        if isinstance(self.source, FileSecret):
            self.source.start(clock)

    def stop(self) -> None:
        if isinstance(self.source, FileSecret):
            self.source.stop()
