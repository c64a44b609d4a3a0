"""One upstream fetch per key across processes (ambassador.cache.peers): two ambassadors in this process
play worker 0 and worker 1 over real UNIX sockets in a private directory; a fake TMDB counts what
reaches it; a Clock times the asks."""

import json
import shutil
import tempfile
from functools import partial

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint, connectProtocol
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from ambassador.cache.responses import cache_key
from ambassador.exchange import UpstreamRequest
from ambassador.cache.peers import ASK_MARGIN, RELAY_TYPE, decode_relay, owner_of, socket_path
from ambassador.adapters.tmdb import TMDBPlugin
from ambassador.pipeline.resilience import Policy
from ambassador.shared.namespace import namespace
from ambassador.testing import QuietSite
from conftest import RawClient, get, header, parse_response, reactor_turns_until, tmdb_env
from test_cache import page

KEY = {"TMDB_API_KEY": "test-api-key"}
TIMEOUT = 10.0


def path_owned_by(adapter_namespace: str, index: int, count: int = 2) -> str:
    """A /movies path whose cache key process ``index`` owns."""
    for n in range(1, 1000):
        request = UpstreamRequest("GET", "/3/discover/movie", (("page", str(n)),))
        if owner_of(cache_key(adapter_namespace, "movies", request), count) == index:
            return f"/movies?page={n}"
    raise AssertionError("no such key")


@pytest.fixture
def owned_by(fake_tmdb):
    """``owned_by(index)``: a path owned by process ``index`` of the TMDB adapter start_peer configures."""
    adapter = TMDBPlugin().configure(tmdb_env(fake_tmdb, **KEY), reactor)
    return partial(path_owned_by, namespace(adapter))


@pytest.fixture
def peer_dir():
    directory = tempfile.mkdtemp(prefix="amb-peers-")  # short: a UNIX socket's path holds 107 bytes at most
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def start_peer(peer_dir, start_ambassador, fake_tmdb, clock):  # peer_dir first: removed after they stop
    """``await start_peer(index)``: an ambassador playing process ``index`` of 2, on ``peer_dir``."""

    async def start(index: int, **settings):
        settings.setdefault("policies", {"tmdb": Policy(retries=0, timeout=TIMEOUT)})
        return await start_ambassador(tmdb_env(fake_tmdb, **KEY), clock=clock, peers=(peer_dir, index, 2), **settings)

    return start


async def ask(ambassador, path):
    response, body = await get(ambassador.url + path)
    return response.code, header(response, "cache-status"), body


def asks(ambassador, outcome: str) -> float | None:
    return ambassador.metrics.registry.get_sample_value("ambassador_peer_asks_total", {"outcome": outcome})


def fallback_warnings(log_events) -> list:
    return [e for e in log_events if "fetching it here instead" in str(e.get("log_format", ""))]


def test_the_owner_of_a_key_is_the_same_in_every_process():
    assert owner_of("tmdb\nmovies\nGET\n/3/discover/movie\npage=1", 2) == 0xB844D70B % 2  # crc32, not hash()
    assert owner_of("anything", 1) == 0
    assert {owner_of(path_owned_by("tmdb:0", 0) + str(n), 3) for n in range(30)} == {0, 1, 2}


@pytest_twisted.ensureDeferred
async def test_a_miss_is_asked_of_the_owner_and_then_hits_in_both(start_peer, fake_tmdb, owned_by, peer_dir):
    owner, asker = await start_peer(1), await start_peer(0)
    path = owned_by(1)
    code, status, body = await ask(asker, path)
    assert (code, status) == (200, "ambassador; fwd=miss; fwd-status=200; stored")
    assert len(fake_tmdb.requests) == 1 and fake_tmdb.requests[0].param("api_key") == "test-api-key"
    assert asks(asker, "relayed") == 1
    assert await ask(owner, path) == (200, "ambassador; hit; ttl=21600", body)
    assert await ask(asker, path) == (200, "ambassador; hit; ttl=21600", body)
    assert asks(asker, "relayed") == 1  # the hit was the asker's own
    assert len(fake_tmdb.requests) == 1
    mine = owned_by(0)  # a key the asker owns: fetched there, and a hit there when 1 asks for it
    assert (await ask(asker, mine))[1] == "ambassador; fwd=miss; fwd-status=200; stored"
    assert (await ask(owner, mine))[1] == "ambassador; hit; ttl=21600"
    assert asks(owner, "relayed") == 1 and len(fake_tmdb.requests) == 2


@pytest_twisted.ensureDeferred
async def test_simultaneous_cold_requests_in_both_processes_make_one_upstream_request(start_peer, fake_tmdb, owned_by):
    owner, asker = await start_peer(1), await start_peer(0)
    fake_tmdb.fault = "hang"
    path = owned_by(1)
    calls = [defer.ensureDeferred(ask(process, path)) for process in (asker, owner) for _ in range(50)]
    waiting = lambda process: sum(len(f.waiters) for f in process.cache._flights.values())  # noqa: E731
    await reactor_turns_until(lambda: waiting(asker) == 50 and waiting(owner) == 51 and fake_tmdb.hanging)
    assert len(fake_tmdb.requests) == 1
    fake_tmdb.canned = page(Cache_Control="max-age=60")
    fake_tmdb.release()
    answers = [await call for call in calls]
    assert {code for code, _, _ in answers} == {200} and len({body for _, _, body in answers}) == 1
    fetched = "ambassador; fwd=miss; fwd-status=200; stored"
    assert sorted(status for _, status, _ in answers) == [fetched] + [fetched + "; collapsed"] * 99
    assert asks(asker, "relayed") == 1 and len(fake_tmdb.requests) == 1
    assert (await ask(asker, path))[1] == "ambassador; hit; ttl=60"


@pytest_twisted.ensureDeferred
async def test_an_upstream_failure_at_the_owner_is_relayed_not_fetched_again(start_peer, fake_tmdb, owned_by):
    await start_peer(1)
    asker = await start_peer(0)
    fake_tmdb.canned = (500, {"Content-Type": "application/json"}, b'{"status_code": 11, "status_message": "x"}')
    response, body = await get(asker.url + owned_by(1))
    assert response.code == 502 and json.loads(body)["type"].endswith(":upstream-error")
    assert asks(asker, "relayed") == 1 and asks(asker, "fallback") == 0
    assert len(fake_tmdb.requests) == 1


@pytest_twisted.ensureDeferred
async def test_when_the_owner_is_not_running_the_asker_fetches_itself_and_says_so(start_peer, fake_tmdb, owned_by,
                                                                                   log_events):
    asker = await start_peer(0)
    path = owned_by(1)
    code, status, _ = await ask(asker, path)
    assert (code, status) == (200, "ambassador; fwd=miss; fwd-status=200; stored")
    assert len(fake_tmdb.requests) == 1 and asks(asker, "fallback") == 1
    [warning] = fallback_warnings(log_events)
    assert warning["owner"] == 1 and "could not be reached" in warning["why"]
    assert (await ask(asker, path))[1] == "ambassador; hit; ttl=21600"
    _, metrics = await get(asker.admin_url + "/metrics")
    assert b'ambassador_peer_asks_total{outcome="fallback"} 1.0' in metrics


class FakePeer(Resource):
    """Listens on a process's peer socket; answers ``answer`` (status, content type, body), or never."""

    isLeaf = True

    def __init__(self, answer=None) -> None:
        super().__init__()
        self.answer = answer
        self.hanging = []
        self.requests = []

    def render(self, request):
        self.requests.append(request)
        if self.answer is None:
            self.hanging.append(request)
            return NOT_DONE_YET
        status, content_type, body = self.answer
        request.setResponseCode(status)
        request.setHeader("Content-Type", content_type)
        return body


@pytest.mark.parametrize("answer, why", [
    ((200, "text/plain", b"hello"), "it answered status 200"),
    ((500, "application/problem+json", b"{}"), "it answered status 500"),
    ((200, RELAY_TYPE, b'{"served": ["x", "no-such-outcome", null, null]}\n'), "its answer could not be read"),
    ((200, RELAY_TYPE, b"not json"), "its answer could not be read"),
])
@pytest_twisted.ensureDeferred
async def test_an_owner_answering_garbage_is_not_believed(start_peer, fake_tmdb, owned_by, peer_dir, log_events, answer, why):
    port = reactor.listenUNIX(socket_path(peer_dir, 1), QuietSite(FakePeer(answer)))
    try:
        asker = await start_peer(0)
        code, status, _ = await ask(asker, owned_by(1))
        assert (code, status) == (200, "ambassador; fwd=miss; fwd-status=200; stored")
        assert len(fake_tmdb.requests) == 1 and asks(asker, "fallback") == 1
        assert [w["why"] for w in fallback_warnings(log_events)] == [why]
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_no_credential_crosses_to_the_owner(start_peer, fake_tmdb, owned_by, peer_dir):
    fake_peer = FakePeer((200, "text/plain", b"no"))
    port = reactor.listenUNIX(socket_path(peer_dir, 1), QuietSite(fake_peer))
    try:
        asker = await start_peer(0)
        path = owned_by(1)
        response, _ = await get(asker.url + path + "&api_key=caller-own-key",
                                headers={"Authorization": "Bearer caller-token", "X-Request-ID": "req-1",
                                         "Accept-Language": "de"})
        assert response.code == 200
        [forwarded] = fake_peer.requests
        assert (forwarded.method, forwarded.uri) == (b"GET", path.encode())
        headers = {name.lower(): values for name, values in forwarded.requestHeaders.getAllRawHeaders()}
        assert headers[b"x-request-id"] == [b"req-1"] and headers[b"accept-language"] == [b"de"]
        assert b"authorization" not in headers and b"caller-own-key" not in repr(headers).encode()
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_an_owner_too_slow_is_given_up_after_the_adapters_timeout(start_peer, fake_tmdb, owned_by, peer_dir, clock,
                                                                         log_events):
    fake_peer = FakePeer()
    port = reactor.listenUNIX(socket_path(peer_dir, 1), QuietSite(fake_peer))
    try:
        asker = await start_peer(0)
        call = defer.ensureDeferred(ask(asker, owned_by(1)))
        await reactor_turns_until(lambda: fake_peer.hanging)
        clock.advance(TIMEOUT + ASK_MARGIN - 0.1)
        assert not call.called and not fake_tmdb.requests
        clock.advance(0.1)
        code, status, _ = await call
        assert (code, status) == (200, "ambassador; fwd=miss; fwd-status=200; stored")
        assert len(fake_tmdb.requests) == 1
        [warning] = fallback_warnings(log_events)
        assert warning["why"] == f"it did not answer within {TIMEOUT + ASK_MARGIN:g} s"
        await reactor_turns_until(lambda: fake_peer.hanging[0]._disconnected)  # the ask's connection is dropped
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_caller_who_leaves_cancels_the_owners_upstream_request(start_peer, fake_tmdb, owned_by):
    owner, asker = await start_peer(1), await start_peer(0)
    fake_tmdb.fault = "hang"
    client = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", int(asker.url.rsplit(":", 1)[1])), client)
    client.transport.write(f"GET {owned_by(1)} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await reactor_turns_until(lambda: fake_tmdb.hanging)
    client.transport.loseConnection()
    await reactor_turns_until(lambda: fake_tmdb.hanging[0]._disconnected)
    assert not owner.cache._flights and not asker.cache._flights
    assert asks(asker, "fallback") == 0


async def peer_exchange(path: str, socket: str) -> tuple[int, dict, bytes]:
    client = RawClient()
    await connectProtocol(UNIXClientEndpoint(reactor, socket), client)
    client.transport.write(f"GET {path} HTTP/1.1\r\nHost: worker\r\nConnection: close\r\n\r\n".encode())
    return parse_response(await client.closed)


@pytest_twisted.ensureDeferred
async def test_a_request_from_a_peer_is_never_forwarded_again(start_peer, fake_tmdb, owned_by, peer_dir, log_events):
    await start_peer(0)
    process = await start_peer(1)
    path = owned_by(0)  # process 0 owns it, but the request came over process 1's peer socket
    status, headers, body = await peer_exchange(path, socket_path(peer_dir, 1))
    assert (status, headers["content-type"]) == (200, RELAY_TYPE)
    served, entry = decode_relay(body)
    assert served.status == "fwd=miss; fwd-status=200; stored" and entry.lifetime == 21600
    assert served.answer.status == 200 and json.loads(served.answer.body)["page"] == int(path.split("=")[1])
    assert len(fake_tmdb.requests) == 1 and asks(process, "relayed") == asks(process, "fallback") == 0
    assert not [e for e in log_events if e.get("log_namespace") == "ambassador.access"]  # the asker logs it


@pytest_twisted.ensureDeferred
async def test_with_redis_the_owner_fetches_and_the_asker_reads_redis(start_peer, fake_tmdb, owned_by, start_redis):
    redis = await start_redis()
    owner, asker = await start_peer(1, cache_url=redis.url()), await start_peer(0, cache_url=redis.url())
    await reactor_turns_until(lambda: owner.readiness.cache_store.available and asker.readiness.cache_store.available)
    fake_tmdb.fault = "hang"
    path = owned_by(1)
    calls = [defer.ensureDeferred(ask(process, path)) for process in (asker, owner) for _ in range(5)]
    await reactor_turns_until(lambda: fake_tmdb.hanging and len(owner.cache._flights) == 1
                              and sum(len(f.waiters) for f in owner.cache._flights.values()) == 6)
    fake_tmdb.canned = page(Cache_Control="max-age=60")
    fake_tmdb.release()
    assert {code for code, _, _ in [await call for call in calls]} == {200}
    assert len(fake_tmdb.requests) == 1 and asks(asker, "relayed") == 1
    assert len((await redis.cli("--scan")).split()) == 1
    assert (await ask(asker, path))[1] == "ambassador; hit; ttl=60"
