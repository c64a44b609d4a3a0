"""Where secrets come from and how they are attached to upstream requests.

A secret is read from an environment variable once, or from a file (a
mounted Kubernetes Secret) that is polled so a rotation takes effect without
a restart. Secret values never appear in a repr, a log event or a Problem.

Every credential provides ``ambassador.interfaces.ICredential``: ``Credential``
attaches a secret as it is (query parameter, header, Bearer, Basic);
``OAuth2ClientCredentials`` first exchanges a client id and secret for an
access token (RFC 6749 §4.4), so its ``attach`` may return a Deferred.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
import os
import stat
from typing import Protocol
from collections.abc import Callable
from urllib.parse import quote_plus, urlencode, urlsplit

from attrs import define, field
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ambassador.exchange import UpstreamRequest, UpstreamResponse, without_params
from ambassador.interfaces import ConfigurationError, ICredential
from ambassador.pipeline.client import ResponseTooLarge, UpstreamClient, UpstreamFailed
from ambassador.problems import Problem

log = Logger()

#: How often a secret file is checked for a new value (seconds). Kubernetes
#: swaps the ``..data`` symlink of a Secret volume; a poll sees the new file.
FILE_POLL_INTERVAL = 1.0
#: A secret file larger than this is refused (a key or token is a line; a wrong path could be a log file).
MAX_SECRET_FILE_BYTES = 65536


class SecretSource(Protocol):
    def current(self) -> str | None:
        """The value to use now, or None when there is none."""

    def describe(self) -> str:
        """Where the value comes from, for messages (never the value)."""

    def files(self) -> tuple[FileSecret, ...]:
        """The files behind the value, which are polled while serving."""

    def hidden(self) -> tuple[str, ...]:
        """The values (current ones) that must never be shown."""


@define(repr=False)
class EnvironmentSecret:
    """A value given in an environment variable, fixed for the life of the process."""

    variable: str
    value: str

    def current(self) -> str | None:
        return self.value or None

    def describe(self) -> str:
        return f"environment variable {self.variable}"

    def files(self) -> tuple[FileSecret, ...]:
        return ()

    def hidden(self) -> tuple[str, ...]:
        return (self.value,) if self.value else ()

    def __repr__(self) -> str:
        return f"<EnvironmentSecret {self.variable}>"


class PlainValue(EnvironmentSecret):
    """A value that is not secret (a user name, a client id) written in the config file at ``variable``."""

    def describe(self) -> str:
        return f"config key {self.variable}"

    def hidden(self) -> tuple[str, ...]:
        return ()

    def __repr__(self) -> str:
        return f"<PlainValue {self.variable}>"


@define(repr=False)
class FileSecret:
    """A value read from a file, re-read when the file changes.

    Surrounding whitespace is stripped. When the file disappears, cannot be
    read, is not a regular file, not UTF-8, larger than MAX_SECRET_FILE_BYTES,
    holds control characters or turns empty, the last good value is kept and
    a warning logged (once per problem); the next good content is taken up.
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

    def files(self) -> tuple[FileSecret, ...]:
        return (self,)

    def hidden(self) -> tuple[str, ...]:
        return (self._value,) if self._value else ()

    def __repr__(self) -> str:
        return f"<FileSecret {self.path}>"

    def reload(self) -> None:
        """Read the file again if it changed since the last read. Never raises and never blocks: whatever
        the path holds (a FIFO, a directory, bytes that are not UTF-8, megabytes), the poll goes on."""
        try:
            self._reload()
        except Exception as e:  # nothing the file holds may stop the poll (a LoopingCall stops on an error)
            self._keep(f"cannot be read ({e.__class__.__name__})")

    def _reload(self) -> None:
        try:
            # stat follows the ..data symlink, so a kubelet swap changes the inode.
            st = os.stat(self.path)
            signature = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
            if signature == self._signature:
                return
            if not stat.S_ISREG(st.st_mode):  # a FIFO would block the reactor in open(), a device never end
                self._keep("is not a regular file")
                return
            # O_NONBLOCK: should it have turned into a FIFO since the stat, open() still returns at once.
            descriptor = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
            with os.fdopen(descriptor, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    self._keep("is not a regular file")
                    return
                data = f.read(MAX_SECRET_FILE_BYTES + 1)
        except OSError as e:
            self._keep(f"cannot be read ({e.__class__.__name__}: {e.strerror or 'error'})")
            return
        if len(data) > MAX_SECRET_FILE_BYTES:
            self._keep(f"is larger than {MAX_SECRET_FILE_BYTES} bytes")
            return
        try:
            value = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            self._keep("is not UTF-8 text")
            return
        if not value:
            self._keep("is empty")
            return
        if any(ord(c) < 32 or ord(c) == 127 for c in value):  # a line break inside, a NUL: not one value
            self._keep("holds control characters (more than one line?)")
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
        return request.with_query(without_params(request.query, lowered) + ((name, secret),))

    return inject


def as_header(name: str, prefix: str = "") -> Injector:
    """Send the secret in header ``name`` (after ``prefix``), replacing any the caller sent."""

    def inject(request: UpstreamRequest, secret: str) -> UpstreamRequest:
        headers = {k: v for k, v in request.headers.items() if k.lower() != name.lower()}
        headers[name] = prefix + secret
        return request.with_headers(headers)

    return inject


def as_bearer_token() -> Injector:
    return as_header("Authorization", "Bearer ")


@define(repr=False)
class BasicPair:
    """``user:password`` encoded for ``Authorization: Basic`` (RFC 7617), each part from its own source."""

    user: SecretSource
    password: SecretSource

    def current(self) -> str | None:
        user, password = self.user.current(), self.password.current()
        if user is None or password is None:
            return None
        return base64.b64encode(f"{user}:{password}".encode()).decode("ascii")

    def describe(self) -> str:
        return f"user from {self.user.describe()}, password from {self.password.describe()}"

    def files(self) -> tuple[FileSecret, ...]:
        return self.user.files() + self.password.files()

    def hidden(self) -> tuple[str, ...]:
        encoded = self.current()
        return self.password.hidden() + ((encoded,) if encoded else ())

    def __repr__(self) -> str:
        return f"<BasicPair {self.describe()}>"


def as_basic() -> Injector:
    """Send a ``BasicPair``'s value as ``Authorization: Basic``."""
    return as_header("Authorization", "Basic ")


class _Sourced:
    """What every credential does with its secret sources: poll, report, redact."""

    def _sources(self) -> tuple[SecretSource, ...]:
        raise NotImplementedError

    def _files(self) -> tuple[FileSecret, ...]:
        return tuple(f for source in self._sources() for f in source.files())

    def missing_reason(self, adapter: str) -> str:
        raise NotImplementedError

    @staticmethod
    def _why_empty(source: SecretSource) -> str:
        """Why ``source`` has no value, naming a file and what is wrong with it (never what it holds)."""
        for f in source.files():
            if f.current() is None and f.problem:
                return f"{f.describe()} {f.problem}"
        return f"{source.describe()} has no value"

    def present(self) -> bool:
        sources = self._sources()
        return bool(sources) and all(source.current() is not None for source in sources)

    def reloads(self) -> int:
        return sum(f.reloads for f in self._files())

    def warning(self) -> str | None:
        """Trouble with a source that does not stop serving (a file gone, the last value kept)."""
        for f in self._files():
            if f.problem and f.current() is not None:
                return f"{f.describe()} {f.problem}; using the last good value"
        return None

    def redact(self, text: str) -> str:
        """``text`` with every current secret replaced, for error text from elsewhere."""
        for source in self._sources():
            for value in source.hidden():
                text = text.replace(value, "[REDACTED]")
        return text

    def fingerprint(self) -> str:
        """A digest standing for the current secrets, never them: what keeps ambassadors with
        different credentials apart in shared state (ambassador.shared.namespace). A rotation moves it;
        an OAuth2 credential's is its client's, so token refreshes do not."""
        return _fingerprint(tuple(source.current() or "" for source in self._sources()))

    def start(self, clock: IReactorTime, client=None) -> None:
        for f in self._files():
            f.start(clock)

    def stop(self) -> None:
        for f in self._files():
            f.stop()

    def _missing(self, adapter: str) -> Problem:
        return Problem(503, "credential-missing", "No credential configured",
                       f"The ambassador has {self.missing_reason(adapter)}")


#: PBKDF2 rounds for a fingerprint: computed once per credential value, and makes testing guesses of
#: a weak secret against a key seen in Redis that many times slower.
FINGERPRINT_ROUNDS = 20_000


@functools.lru_cache(maxsize=64)
def _fingerprint(values: tuple[str, ...]) -> str:
    secret = b"\0".join(value.encode("utf-8", "surrogateescape") for value in values)
    return hashlib.pbkdf2_hmac("sha256", secret, b"ambassador shared-state namespace", FINGERPRINT_ROUNDS)[:8].hex()


@implementer(ICredential)
@define(repr=False)
class Credential(_Sourced):
    """A secret source plus the way it is attached; ``missing_hint`` says what to set."""

    source: SecretSource | None
    inject: Injector
    missing_hint: str

    def __repr__(self) -> str:
        return f"<Credential from {self.source.describe() if self.source else 'nowhere'}>"

    def _sources(self) -> tuple[SecretSource, ...]:
        return (self.source,) if self.source is not None else ()

    def attach(self, request: UpstreamRequest, adapter: str) -> defer.Deferred:
        secret = self.source.current() if self.source is not None else None
        if secret is None:
            return defer.fail(self._missing(adapter))
        return defer.succeed(self.inject(request, secret))

    def rejected(self, sent: UpstreamRequest) -> bool:
        return False  # a fixed secret is not made better by asking again

    def missing_reason(self, adapter: str) -> str:
        where = f" ({self._why_empty(self.source)})" if self.source else ""
        return f"no credential for {adapter}{where}. {self.missing_hint}"


#: An access token is used until this share of its lifetime (``expires_in``)
#: is left, at most REFRESH_MARGIN seconds: the token must not expire on its way.
REFRESH_SHARE = 0.1
REFRESH_MARGIN = 30.0
_OAUTH_ERROR_CODE = frozenset("abcdefghijklmnopqrstuvwxyz_")
_as_bearer = as_bearer_token()


@implementer(ICredential)
@define(repr=False)
class OAuth2ClientCredentials(_Sourced):
    """An OAuth2 access token from the client credentials grant (RFC 6749 §4.4), sent as Bearer.

    The token is cached until shortly before ``expires_in`` (on the clock
    given to ``start``); requests that need a new one while it is being
    fetched wait for that one token request. ``client_auth`` is ``basic``
    (HTTP Basic with the form-encoded id and secret, RFC 6749 §2.3.1) or
    ``form`` (``client_id`` and ``client_secret`` in the request body).
    """

    token_url: str
    client_id: SecretSource
    client_secret: SecretSource
    missing_hint: str
    scope: str = ""
    audience: str = ""
    client_auth: str = "basic"
    timeout: float = 10.0
    problem: str | None = field(default=None, init=False)  # why the last token request failed
    _clock: IReactorTime | None = field(default=None, init=False)
    _client: UpstreamClient | None = field(default=None, init=False)
    _token: str | None = field(default=None, init=False)
    _fresh_until: float = field(default=0.0, init=False)
    _waiting: list[defer.Deferred] = field(factory=list, init=False)

    def __repr__(self) -> str:
        return f"<OAuth2ClientCredentials {self._host()} client from {self.client_id.describe()}>"

    def _sources(self) -> tuple[SecretSource, ...]:
        return (self.client_id, self.client_secret)

    def _host(self) -> str:
        return urlsplit(self.token_url).netloc

    def start(self, clock: IReactorTime, client=None) -> None:
        super().start(clock)
        self._clock, self._client = clock, client

    def attach(self, request: UpstreamRequest, adapter: str) -> defer.Deferred:
        if not self.present():
            return defer.fail(self._missing(adapter))
        if self._token is not None and self._clock is not None and self._clock.seconds() < self._fresh_until:
            return defer.succeed(_as_bearer(request, self._token))
        waiter: defer.Deferred = defer.Deferred()
        self._waiting.append(waiter)
        if len(self._waiting) == 1:  # the first one asks; the others wait for its answer
            defer.ensureDeferred(self._request_token(adapter)).addBoth(self._hand_out)
        return waiter.addCallback(lambda token: _as_bearer(request, token))

    def rejected(self, sent: UpstreamRequest) -> bool:
        """The upstream answered 401: forget the token it was sent, so the retry gets a new one."""
        if self._token is not None and sent.headers.get("Authorization") == f"Bearer {self._token}":
            self._token = None
        return True

    def missing_reason(self, adapter: str) -> str:
        empty = [self._why_empty(s) for s in self._sources() if s.current() is None]
        return f"no OAuth2 client credentials for {adapter} ({'; '.join(empty)}). {self.missing_hint}"

    def warning(self) -> str | None:
        if self.problem:
            return f"the last token request failed: {self.problem}"
        return super().warning()

    def redact(self, text: str) -> str:
        return super().redact(text.replace(self._token, "[REDACTED]") if self._token else text)

    def _hand_out(self, result) -> None:
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:  # a waiter its caller cancelled ignores this
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    async def _request_token(self, adapter: str) -> str:
        client_id, secret = self.client_id.current(), self.client_secret.current()
        assert client_id is not None and secret is not None  # attach checked present() just before
        assert self._client is not None and self._clock is not None  # start() came first
        form = [("grant_type", "client_credentials")]
        form += [(name, value) for name, value in (("scope", self.scope), ("audience", self.audience)) if value]
        headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
        if self.client_auth == "basic":
            pair = f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
        else:
            form += [("client_id", client_id), ("client_secret", secret)]
        url = urlsplit(self.token_url)
        request = UpstreamRequest("POST", url.path or "/", headers=headers, body=urlencode(form).encode())
        call = defer.ensureDeferred(self._client.fetch(f"{url.scheme}://{url.netloc}", request))
        call.addTimeout(self.timeout, self._clock, onTimeoutCancel=lambda result, timeout: Failure(defer.TimeoutError()))
        asked = self._clock.seconds()
        try:
            response = await call
        except defer.TimeoutError:
            raise self._failed(adapter, 502, "token-endpoint-failed", f"did not answer within {self.timeout:g} s")
        except UpstreamFailed as e:  # the client's reason names the kind, never the URL
            raise self._failed(adapter, 502, "token-endpoint-failed", e.reason)
        except ResponseTooLarge as e:
            raise self._failed(adapter, 502, "token-endpoint-failed", f"answered with more than {e.limit} bytes")
        token, lifetime = self._read_token(adapter, response)
        self._token, self.problem = token, None
        self._fresh_until = asked + lifetime - min(REFRESH_MARGIN, lifetime * REFRESH_SHARE)
        log.info("New OAuth2 access token for {adapter} from {host} (expires_in {expires_in})",
                 adapter=adapter, host=self._host(), expires_in=None if math.isinf(lifetime) else lifetime)
        return token

    def _read_token(self, adapter: str, response: UpstreamResponse) -> tuple[str, float]:
        try:
            document = json.loads(response.body)
        except (ValueError, UnicodeDecodeError):
            document = None
        document = document if isinstance(document, dict) else {}
        if response.status == 429 or response.status >= 500:
            raise self._failed(adapter, 503, "token-endpoint-unavailable", f"answered status {response.status}")
        if response.status != 200:
            code = document.get("error")
            said = f" (error {code})" if isinstance(code, str) and set(code) <= _OAUTH_ERROR_CODE else ""
            raise self._failed(adapter, 502, "token-request-rejected",
                               f"refused the token request with status {response.status}{said}; check the "
                               "client id, client secret, scope and audience the ambassador was given")
        token, token_type = document.get("access_token"), document.get("token_type", "Bearer")
        if not (isinstance(token, str) and token and isinstance(token_type, str) and token_type.lower() == "bearer"):
            raise self._failed(adapter, 502, "token-endpoint-failed", "answered without a Bearer access_token")
        try:
            lifetime = float(document.get("expires_in", math.inf))
        except (TypeError, ValueError):
            lifetime = -1.0
        if not lifetime > 0:
            raise self._failed(adapter, 502, "token-endpoint-failed", "answered an expires_in that is not a "
                               "positive number")
        return token, lifetime

    def _failed(self, adapter: str, status: int, kind: str, what: str) -> Problem:
        # The log and /upstreams name the token endpoint for the operator; the caller's problem does not.
        self.problem = f"the token endpoint ({self._host()}) {what}"
        log.warn("No OAuth2 access token for {adapter}: {problem}", adapter=adapter, problem=self.problem)
        return Problem(status, kind, "No access token",
                       f"The ambassador could not get an OAuth2 access token for {adapter}: the token endpoint {what}.")
