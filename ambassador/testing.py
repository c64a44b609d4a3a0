"""Fake outside services and a running ambassador for tests: real twisted.web servers on loopback.

Our own tests use them, and so can anyone testing an application or an
adapter against the ambassador without a network::

    fake = FakeTMDB(api_keys={"my-key"})
    port = serve(fake)            # http://127.0.0.1:<port>
    ambassador = start_ambassador([TMDBPlugin().configure({"TMDB_BASE_URL": port.base_url, ...}, reactor)])
    # ... requests to ambassador.url ...
    await ambassador.service.stopService()

``FakeOAuth2TokenEndpoint`` and ``FakeAPI`` stand in for an OAuth2
authorization server and for any API behind the generic ``http`` adapter.
``RedisServer`` runs a real, throwaway ``redis-server`` for the shared cache.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sys
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator
from urllib.parse import parse_qsl, unquote_plus

from attrs import define, field, frozen
from twisted.internet import defer, protocol
from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from ambassador.app.service import Ambassador, assemble, endpoint_description


@frozen
class RecordedRequest:
    method: str
    path: str
    query: tuple[tuple[str, str], ...]
    headers: dict[str, str]
    body: bytes = b""

    def param(self, name: str) -> str | None:
        return dict(self.query).get(name)


def record(request) -> RecordedRequest:
    """What a twisted.web request asked for."""
    path, _, query = request.uri.partition(b"?")
    return RecordedRequest(
        method=request.method.decode(),
        path=path.decode("latin-1"),
        query=tuple(parse_qsl(query.decode("latin-1"), keep_blank_values=True)),
        headers={k.decode().lower(): v[0].decode("latin-1") for k, v in request.requestHeaders.getAllRawHeaders()},
        body=request.content.read(),
    )


def json_answer(request, status: int, document: dict) -> bytes:
    request.setResponseCode(status)
    request.setHeader("Content-Type", "application/json")
    return json.dumps(document).encode()


class QuietSite(Site):
    # A fake's access log would show the credentials it was sent, mixed into the ambassador's log.
    noisy = False

    def log(self, request) -> None:
        pass


def serve(resource: Resource, reactor=None):
    """Listen on an ephemeral loopback port; the returned port's ``base_url`` says where."""
    if reactor is None:
        from twisted.internet import reactor
    site = QuietSite(resource)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    port.base_url = f"http://127.0.0.1:{port.getHost().port}"
    return port


@contextmanager
def serving(fake: Resource) -> Iterator[Resource]:
    """``fake`` served on loopback (see ``serve``) for the block, with its ``base_url`` set."""
    port = serve(fake)
    fake.base_url = port.base_url
    try:
        yield fake
    finally:
        port.stopListening()


def start_ambassador(adapters: Iterable, **settings) -> Ambassador:
    """Serve configured ``adapters`` as ``twistd ambassador`` does, proxy and admin listeners on
    ephemeral loopback ports; keywords go to ``ambassador.app.service.assemble`` (``clock=Clock()``
    drives every timer). The result's ``url`` and ``admin_url`` say where; stop it with
    ``service.stopService()``."""
    from twisted.internet import reactor

    ambassador = assemble(reactor, list(adapters), endpoint=endpoint_description("0", bare_interface="127.0.0.1"),
                          admin_endpoint="tcp:0:interface=127.0.0.1", **settings)
    ambassador.service.privilegedStartService()
    ambassador.service.startService()
    ambassador.url = f"http://127.0.0.1:{ambassador.proxy.port.getHost().port}"
    ambassador.admin_url = f"http://127.0.0.1:{ambassador.admin.port.getHost().port}"
    return ambassador


@contextmanager
def logged_events(*, secrets: Iterable[str] = ()) -> Iterator[list[dict]]:
    """Every log event emitted inside the block; on leaving it, fails if one shows any of ``secrets``."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)
    for event in events:
        text = f"{formatEvent(event)} {event!r}"
        if "log_failure" in event:
            text += event["log_failure"].getTraceback()
        for secret in secrets:
            assert secret not in text, f"secret {secret!r} leaked into a log event: {text}"


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


def _tmdb_error(status_code: int, message: str) -> dict:
    return {"status_code": status_code, "status_message": message, "success": False}


INVALID_KEY = _tmdb_error(7, "Invalid API key: You must be granted a valid key.")
NOT_FOUND = _tmdb_error(34, "The resource you requested could not be found.")
INVALID_PAGE = _tmdb_error(22, "Invalid page: Pages start at 1 and max at 500. They are expected to be an integer.")

MOVIES = [
    {"id": 550, "title": "Fight Club", "release_date": "1999-10-15", "popularity": 61.4, "vote_count": 30122,
     "vote_average": 8.4, "overview": "A ticking-time-bomb insomniac and a slippery soap salesman ..."},
    {"id": 603, "title": "The Matrix", "release_date": "1999-03-30", "popularity": 80.2, "vote_count": 26512,
     "vote_average": 8.2, "overview": "Set in the 22nd century, The Matrix tells the story of a computer hacker ..."},
    {"id": 13, "title": "Forrest Gump", "release_date": "1994-06-23", "popularity": 70.9, "vote_count": 27781,
     "vote_average": 8.5, "overview": "A man with a low IQ has accomplished great things in his life ..."},
    {"id": 680, "title": "Pulp Fiction", "release_date": "1994-09-10", "popularity": 66.0, "vote_count": 28321,
     "vote_average": 8.5, "overview": "A burger-loving hit man, his philosophical partner ..."},
]


@define
class FakeService(Resource):
    """The part every fake outside service shares: it records each request in ``requests``."""

    requests: list[RecordedRequest] = field(factory=list)
    _waiting: list[Deferred] = field(factory=list)
    isLeaf = True

    def __attrs_post_init__(self) -> None:
        Resource.__init__(self)

    def record(self, request) -> RecordedRequest:
        """Keep what ``request`` asked for, and fire ``next_request()`` waiters."""
        return self.keep(record(request))

    def keep(self, recorded: RecordedRequest) -> RecordedRequest:
        self.requests.append(recorded)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(recorded)
        return recorded

    def next_request(self) -> Deferred:
        """Fires with the next request this fake receives (to sequence a test without sleeping)."""
        d = Deferred()
        self._waiting.append(d)
        return d


@define
class FakeTMDB(FakeService):
    """A TMDB v3 look-alike: discover, movie details, search, and TMDB's real error answers.

    It accepts ``api_key`` query parameters from ``api_keys`` and bearer
    tokens from ``tokens`` and records every request in ``requests``. To
    inject faults set ``fault`` to ``"hang"`` (never answer; ``release()``
    answers them later) or ``"reset"`` (drop the connection), or set
    ``canned`` to ``(status, headers, body)`` to answer that once the
    credential has been checked. ``script`` is a list of such faults or
    canned answers used up one per request, before ``fault`` and ``canned``.

    Like TMDB, its data pages say ``Cache-Control: public, max-age=<max_age>``
    and carry an ETag; a request whose ``If-None-Match`` holds it gets 304.
    """

    api_keys: set[str] = field(factory=lambda: {"test-api-key"})
    tokens: set[str] = field(factory=lambda: {"test-read-token"})
    max_age: int = 21600
    fault: str | None = None
    canned: tuple[int, dict[str, str], bytes] | None = None
    script: list = field(factory=list)
    hanging: list = field(factory=list)

    def render(self, request):
        recorded = self.record(request)
        step = self.script.pop(0) if self.script else (self.fault or self.canned)
        if step == "hang":
            self.hanging.append(request)
            return NOT_DONE_YET
        if step == "reset":
            request.transport.abortConnection()
            return NOT_DONE_YET
        if not self._authorized(recorded):
            return self._json(request, 401, INVALID_KEY)
        if step is not None:
            return _canned(request, step)
        if recorded.method not in ("GET", "HEAD"):
            return self._json(request, 405, _tmdb_error(3, "Method not allowed"))
        return self._route(request, recorded)

    def release(self) -> None:
        """Answer every hanging request as if nothing had been wrong (with ``canned`` when set)."""
        hanging, self.hanging = self.hanging, []
        for request in hanging:
            if not request._disconnected:
                request.write(_canned(request, self.canned) if self.canned else self._json(request, 200, MOVIES[0]))
                request.finish()

    def _authorized(self, recorded: RecordedRequest) -> bool:
        authorization = recorded.headers.get("authorization", "")
        if authorization.startswith("Bearer "):
            return authorization[len("Bearer "):] in self.tokens
        return recorded.param("api_key") in self.api_keys

    def _route(self, request, recorded: RecordedRequest):
        parts = recorded.path.strip("/").split("/")
        if parts == ["3", "discover", "movie"]:
            return self._discover(request, recorded)
        if parts == ["3", "search", "movie"]:
            text = (recorded.param("query") or "").lower()
            return self._page(request, [m for m in MOVIES if text and text in m["title"].lower()], 1)
        if len(parts) == 3 and parts[:2] == ["3", "movie"]:
            movie = next((m for m in MOVIES if str(m["id"]) == parts[2]), None)
            if movie is not None:
                return self._json(request, 200, movie, cache=True)
        if parts == ["3", "configuration"]:
            return self._json(request, 200, {"images": {"base_url": "http://image.tmdb.org/t/p/"}}, cache=True)
        return self._json(request, 404, NOT_FOUND)

    def _discover(self, request, recorded: RecordedRequest):
        page = recorded.param("page") or "1"
        if not page.isdigit() or not 1 <= int(page) <= 500:
            return self._json(request, 400, INVALID_PAGE)
        key, _, order = (recorded.param("sort_by") or "popularity.desc").partition(".")
        movies = sorted(MOVIES, key=lambda m: m.get(key, 0), reverse=order != "asc")
        return self._page(request, movies, int(page))

    def _page(self, request, movies, page: int):
        results = movies if page == 1 else []
        document = {"page": page, "results": results, "total_pages": 1, "total_results": len(movies)}
        return self._json(request, 200, document, cache=True)

    def _json(self, request, status: int, document: dict, cache: bool = False) -> bytes:
        body = json.dumps(document).encode()
        request.setResponseCode(status)
        request.setHeader("Content-Type", "application/json;charset=utf-8")
        request.setHeader("Set-Cookie", "tmdb.session=abc; Path=/")
        request.setHeader("Server", "openresty")
        if cache:
            etag = '"%s"' % hashlib.sha256(body).hexdigest()[:16]
            request.setHeader("Cache-Control", f"public, max-age={self.max_age}")
            request.setHeader("ETag", etag)
            if request.getHeader("if-none-match") == etag:
                request.setResponseCode(304)
                return b""
        return body


def _canned(request, answer: tuple[int, dict[str, str], bytes]) -> bytes:
    status, headers, body = answer
    request.setResponseCode(status)
    for name, value in headers.items():
        request.setHeader(name, value)
    return body


@define
class FakeOAuth2TokenEndpoint(FakeService):
    """An OAuth2 authorization server's token endpoint for the client credentials grant (RFC 6749 §4.4).

    It knows the clients in ``clients`` (id → secret), taken as HTTP Basic
    (form-encoded, RFC 6749 §2.3.1) or as ``client_id``/``client_secret`` form
    fields, and issues ``<prefix>-1``, ``<prefix>-2`` … valid for
    ``expires_in`` seconds (the fake does not expire them: ``revoke()`` does).
    Every request is kept in ``requests`` (``next_request()`` waits for one). Set ``fault`` to ``"error"`` (500),
    ``"reject"`` (401 ``invalid_client`` whatever is sent) or ``"hold"`` (answer
    only when ``release()`` is called).
    """

    clients: dict[str, str] = field(factory=lambda: {"test-client": "test-client-secret"})
    expires_in: int | None = 3600
    prefix: str = "test-access-token"
    issued: list[str] = field(factory=list)
    revoked: set[str] = field(factory=set)
    fault: str | None = None
    _held: list = field(factory=list)

    def valid(self, token: str) -> bool:
        return token in self.issued and token not in self.revoked

    def revoke(self) -> None:
        self.revoked.update(self.issued)

    def release(self) -> None:
        held, self._held = self._held, []
        for request, recorded in held:
            if not request._disconnected:
                request.write(self._answer(request, recorded))
                request.finish()

    def render(self, request):
        recorded = record(request)
        if self.fault == "hold":  # held before waiters hear of it, so they can release it
            self._held.append((request, recorded))
            self.keep(recorded)
            return NOT_DONE_YET
        self.keep(recorded)
        return self._answer(request, recorded)

    def _answer(self, request, recorded: RecordedRequest) -> bytes:
        form = dict(parse_qsl(recorded.body.decode("latin-1")))
        if self.fault == "error":
            return json_answer(request, 500, {"error": "server_error"})
        if recorded.method != "POST" or form.get("grant_type") != "client_credentials":
            return json_answer(request, 400, {"error": "unsupported_grant_type"})
        client_id, secret = form.get("client_id"), form.get("client_secret")
        authorization = recorded.headers.get("authorization", "")
        if authorization.startswith("Basic "):
            pair = base64.b64decode(authorization[len("Basic "):]).decode()
            client_id, secret = (unquote_plus(part) for part in pair.split(":", 1))
        if self.fault == "reject" or self.clients.get(client_id) != secret or secret is None:
            request.setHeader("WWW-Authenticate", 'Basic realm="fake"')
            return json_answer(request, 401, {"error": "invalid_client"})
        token = f"{self.prefix}-{len(self.issued) + 1}"
        self.issued.append(token)
        document = {"access_token": token, "token_type": "Bearer"}
        if self.expires_in is not None:
            document["expires_in"] = self.expires_in
        return json_answer(request, 200, document)


@define
class FakeAPI(FakeService):
    """Any JSON API: answers 200 with the method, path and body it was sent when ``accept(request)``
    holds, else 401 (it never echoes headers or the query, which carry credentials).

    Requests are kept in ``requests`` (``next_request()`` waits for one). ``answers`` maps a path to a canned
    ``(status, body)`` answered instead (once the credential is accepted).
    """

    accept: Callable[[RecordedRequest], bool] = field(kw_only=True)
    answers: dict[str, tuple[int, dict]] = field(factory=dict)

    def render(self, request):
        recorded = self.record(request)
        if not self.accept(recorded):
            request.setHeader("WWW-Authenticate", "Bearer")
            return json_answer(request, 401, {"error": "unauthorized"})
        if recorded.path in self.answers:
            return json_answer(request, *self.answers[recorded.path])
        return json_answer(request, 200, {"method": recorded.method, "path": recorded.path,
                                          "body": recorded.body.decode("latin-1")})


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
