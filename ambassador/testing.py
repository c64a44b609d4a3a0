"""What an adapter's tests need, and an application's tests against the ambassador: fake outside services.

Every fake is a ``twisted.web`` Resource that records each request it gets
(``FakeService``): ``FakeTMDB`` (TMDB v3, with its real error answers and fault
injection), ``FakeOAuth2TokenEndpoint`` (an OAuth2 token endpoint), ``FakeAPI``
(any JSON API behind the generic ``http`` adapter). Being Resources, they work
in memory as they are, through ``treq.testing.StubTreq`` (no sockets)::

    fake = FakeTMDB()
    client = treq.testing.StubTreq(fake)
    response = await client.get("http://tmdb.test/3/movie/550?api_key=test-api-key")

or on a loopback port with ``serve`` / ``serving`` (``gzip=True``: answering gzip
to a request that asks for it, as TMDB does), with an ambassador in front of
them, in this process, as ``twistd ambassador`` would serve it::

    port = serve(FakeTMDB(api_keys={"my-key"}))            # port.base_url: http://127.0.0.1:<port>
    ambassador = start_ambassador([TMDBPlugin().configure({"TMDB_BASE_URL": port.base_url, ...}, reactor)])
    # ... requests to ambassador.url ...
    await ambassador.service.stopService()

``logged_events(secrets=...)`` fails a test in which a secret reaches a log event.
Running ``twistd`` as a child process and a real ``redis-server`` are the
ambassador's own test helpers (``tests/processes.py``, ``tests/redis_server.py``).
"""

from __future__ import annotations

import base64
import hashlib
import json
from contextlib import contextmanager
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote_plus

from attrs import define, field, frozen
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.resource import EncodingResourceWrapper, Resource
from twisted.web.server import NOT_DONE_YET, GzipEncoderFactory, Site

from ambassador.app.service import Ambassador, Listener, assemble, endpoint_description
from ambassador.app.settings import Settings

__all__ = [
    "FakeAPI",
    "FakeOAuth2TokenEndpoint",
    "FakeService",
    "FakeTMDB",
    "QuietSite",
    "RecordedRequest",
    "json_answer",
    "logged_events",
    "record",
    "serve",
    "serving",
    "start_ambassador",
]


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


def serve(resource: Resource, reactor=None, *, gzip: bool = False):
    """Listen on an ephemeral loopback port; the returned port's ``base_url`` says where. With ``gzip``,
    a request that asks for it (``Accept-Encoding: gzip``) is answered gzip, as TMDB does (twisted.web's
    ``GzipEncoderFactory``)."""
    if reactor is None:
        from twisted.internet import reactor
    if gzip:
        resource = EncodingResourceWrapper(resource, [GzipEncoderFactory()])
    site = QuietSite(resource)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    port.base_url = f"http://127.0.0.1:{port.getHost().port}"
    return port


@contextmanager
def serving(fake: F, *, gzip: bool = False) -> Iterator[F]:
    """``fake`` served on loopback (see ``serve``) for the block, with its ``base_url`` set."""
    port = serve(fake, gzip=gzip)
    fake.base_url = port.base_url
    try:
        yield fake
    finally:
        port.stopListening()


def start_ambassador(adapters: Iterable, *, clock=None, rng=None, peers=None, **settings) -> Ambassador:
    """Serve configured ``adapters`` as ``twistd ambassador`` does, proxy and admin listeners on
    ephemeral loopback ports; other keywords are fields of ``ambassador.app.settings.Settings``
    (``cache_bytes``, ``policies``, ...); ``clock=Clock()`` drives every timer, ``rng`` the retry
    jitter. The result's ``url`` and ``admin_url`` say where; stop it with
    ``service.stopService()``."""
    from twisted.internet import reactor

    record = Settings(adapters=adapters, endpoint=endpoint_description("0", bare_interface="127.0.0.1"),
                      admin_endpoint="tcp:0:interface=127.0.0.1", **settings)
    ambassador = assemble(reactor, record, clock=clock, rng=rng, peers=peers)
    ambassador.service.privilegedStartService()
    ambassador.service.startService()
    assert ambassador.admin is not None  # admin_endpoint is set above
    ambassador.url = f"http://127.0.0.1:{_port_of(ambassador.proxy)}"
    ambassador.admin_url = f"http://127.0.0.1:{_port_of(ambassador.admin)}"
    return ambassador


def _port_of(listener: Listener) -> int:
    # A tcp: endpoint listens at once, in privilegedStartService.
    assert listener.port is not None
    address = listener.port.getHost()
    assert isinstance(address, IPv4Address)
    return address.port


@contextmanager
def logged_events(*, secrets: Iterable[str] = ()) -> Iterator[list[dict]]:
    """Every log event emitted inside the block; on leaving it, fails if one shows any of ``secrets``."""
    events: list[dict] = []
    # Twisted takes any callable as an ILogObserver; zope cannot declare that a bound method provides it.
    globalLogPublisher.addObserver(events.append)  # type: ignore[arg-type]
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)  # type: ignore[arg-type]
    for event in events:
        text = f"{formatEvent(event)} {event!r}"
        if "log_failure" in event:
            text += event["log_failure"].getTraceback()
        for secret in secrets:
            assert secret not in text, f"secret {secret!r} leaked into a log event: {text}"


def _tmdb_error(status_code: int, message: str) -> dict:
    return {"status_code": status_code, "status_message": message, "success": False}


INVALID_KEY = _tmdb_error(7, "Invalid API key: You must be granted a valid key.")
NOT_FOUND = _tmdb_error(34, "The resource you requested could not be found.")
INVALID_PAGE = _tmdb_error(22, "Invalid page: Pages start at 1 and max at 500. They are expected to be an integer.")

MOVIES: list[dict[str, Any]] = [  # as TMDB's JSON has them
    {"id": 550, "title": "Fight Club", "release_date": "1999-10-15", "popularity": 61.4, "vote_count": 30122,
     "vote_average": 8.4, "overview": "A ticking-time-bomb insomniac and a slippery soap salesman ..."},
    {"id": 603, "title": "The Matrix", "release_date": "1999-03-30", "popularity": 80.2, "vote_count": 26512,
     "vote_average": 8.2, "overview": "Set in the 22nd century, The Matrix tells the story of a computer hacker ..."},
    {"id": 13, "title": "Forrest Gump", "release_date": "1994-06-23", "popularity": 70.9, "vote_count": 27781,
     "vote_average": 8.5, "overview": "A man with a low IQ has accomplished great things in his life ..."},
    {"id": 680, "title": "Pulp Fiction", "release_date": "1994-09-10", "popularity": 66.0, "vote_count": 28321,
     "vote_average": 8.5, "overview": "A burger-loving hit man, his philosophical partner ..."},
]


F = TypeVar("F", bound="FakeService")

@define
class FakeService(Resource):
    """The part every fake outside service shares: it records each request in ``requests``."""

    base_url: str = field(default="", init=False, repr=False, eq=False)  # where ``serving`` serves it
    requests: list[RecordedRequest] = field(factory=list)
    _waiting: list[Deferred] = field(factory=list)
    _lost: set = field(factory=set)  # held requests whose caller went away
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
        d: Deferred[RecordedRequest] = Deferred()
        self._waiting.append(d)
        return d

    def hold(self, request) -> None:
        """``request`` is answered later (its render returns NOT_DONE_YET): watch for its caller leaving."""
        request.notifyFinish().addErrback(lambda _: self._lost.add(request))

    def connected(self, request) -> bool:
        """Whether the caller of a held request is still there to be answered."""
        return request not in self._lost


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

    With ``base_path`` (``/tmdb``) it answers below that prefix, as an egress
    gateway that serves TMDB under a path would, and 404 elsewhere.

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
    base_path: str = ""

    def render(self, request):
        recorded = self.record(request)
        step = self.script.pop(0) if self.script else (self.fault or self.canned)
        if step == "hang":
            self.hold(request)
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
            if self.connected(request):
                request.write(_canned(request, self.canned) if self.canned else self._json(request, 200, MOVIES[0]))
                request.finish()

    def _authorized(self, recorded: RecordedRequest) -> bool:
        authorization = recorded.headers.get("authorization", "")
        if authorization.startswith("Bearer "):
            return authorization[len("Bearer "):] in self.tokens
        return recorded.param("api_key") in self.api_keys

    def _route(self, request, recorded: RecordedRequest):
        if not recorded.path.startswith(self.base_path + "/"):
            return self._json(request, 404, NOT_FOUND)
        parts = recorded.path[len(self.base_path):].strip("/").split("/")
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
            if self.connected(request):
                request.write(self._answer(request, recorded))
                request.finish()

    def render(self, request):
        recorded = record(request)
        if self.fault == "hold":  # held before waiters hear of it, so they can release it
            self.hold(request)
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
        if self.fault == "reject" or client_id is None or secret is None or self.clients.get(client_id) != secret:
            request.setHeader("WWW-Authenticate", 'Basic realm="fake"')
            return json_answer(request, 401, {"error": "invalid_client"})
        token = f"{self.prefix}-{len(self.issued) + 1}"
        self.issued.append(token)
        document: dict[str, object] = {"access_token": token, "token_type": "Bearer"}
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
