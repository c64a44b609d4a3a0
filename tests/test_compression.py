"""Compressed answers through the whole ambassador, over loopback: gzip asked only when the adapter opts in
(``accept_encoding``), decoded before the adapter and the cache see it, identity for the caller, and the
upstream's bad or hostile encodings (a bomb, a corrupt stream, a coding never asked for) as 502 problems."""

from __future__ import annotations

import gzip
import json

import pytest
import pytest_twisted
from attrs import asdict, define, field
from twisted.internet import reactor
from twisted.web.resource import EncodingResourceWrapper
from twisted.web.server import GzipEncoderFactory

from ambassador.adapters.http import HTTPAdapter
from ambassador.adapters.tmdb import TMDBAdapter, TMDBPlugin
from ambassador.app.discovery import Discovery
from ambassador.app.reload import load_adapters
from ambassador.app.settings import AdapterSpec
from ambassador.interfaces import ConfigurationError
from ambassador.testing import MOVIES, FakeService, FakeTMDB, serving
from conftest import adapters_from_yaml, raw_exchange

KEY = {"KEY": "test-api-key"}
CAP = 1024 * 1024


class CountingGzip(GzipEncoderFactory):
    """twisted.web's gzip encoding, counting the answers it compressed."""

    compressed = 0

    def encoderForRequest(self, request):
        encoder = super().encoderForRequest(request)
        if encoder is not None:
            self.compressed += 1
        return encoder


@define
class Encoded(FakeService):
    """Answers each request with the next of ``answers``: (Content-Encoding or None, body bytes), cacheable
    JSON; and keeps the port of the connection each request came on."""

    answers: list[tuple[str | None, bytes]] = field(factory=list)
    ports: list[int] = field(factory=list)

    def render(self, request):
        self.record(request)
        self.ports.append(request.getClientAddress().port)
        coding, body = self.answers.pop(0) if self.answers else (None, b'{"ok": true}')
        request.setHeader("Content-Type", "application/json")
        request.setHeader("Cache-Control", "max-age=600")
        if coding is not None:
            request.setHeader("Content-Encoding", coding)
        return body


def api_yaml(base_url: str, extra: str = "") -> str:
    return ("adapters:\n  api:\n    mount: /api\n"
            f"    base_url: {base_url}\n{extra}"
            "    credential: {style: query, secret: {env: KEY}}\n")


class SmallAPI(HTTPAdapter):
    max_response_bytes = CAP


async def get(url: str) -> tuple[int, dict[str, str], bytes]:
    """A caller's GET that would take gzip: (status, headers, body) as the bytes came (no client decodes them)."""
    base, _, path = url.partition("//")[2].partition("/")
    return await raw_exchange("http://" + base, f"GET /{path} HTTP/1.1\r\nHost: localhost\r\n"
                                                 "Accept-Encoding: gzip\r\nConnection: close\r\n\r\n".encode())


def problem_of(headers: dict[str, str], body: bytes) -> dict:
    assert headers["content-type"] == "application/problem+json"
    return json.loads(body)


@pytest.mark.parametrize("extra, asked", [("", None), ("    accept_encoding: identity\n", None),
                                          ("    accept_encoding: gzip\n", "gzip")])
@pytest_twisted.ensureDeferred
async def test_gzip_is_asked_only_when_the_adapter_opts_in(start_ambassador, tmp_path, serve_fake, extra, asked):
    fake, counting = Encoded(), CountingGzip()
    base_url = serve_fake(EncodingResourceWrapper(fake, [counting]))
    ambassador = await start_ambassador(adapters=adapters_from_yaml(tmp_path, api_yaml(base_url, extra), KEY))
    status, headers, body = await get(ambassador.url + "/api/things")
    assert status == 200
    assert fake.requests[0].headers.get("accept-encoding") == asked  # the caller's own is never forwarded
    assert counting.compressed == (1 if asked else 0)
    assert body == b'{"ok": true}'
    assert "content-encoding" not in headers


@pytest_twisted.ensureDeferred
async def test_tmdb_asks_for_gzip_and_the_decoded_answer_reaches_the_adapter_the_cache_and_the_caller(
        start_ambassador, serve_fake):
    fake, counting = FakeTMDB(), CountingGzip()
    base_url = serve_fake(EncodingResourceWrapper(fake, [counting]))
    ambassador = await start_ambassador({"TMDB_BASE_URL": base_url, "TMDB_API_KEY": "test-api-key"})
    identity = json.dumps(MOVIES[0]).encode()
    for _ in range(2):  # the second is the cache's
        status, headers, body = await get(ambassador.url + "/tmdb/3/movie/550")
        assert status == 200
        assert body == identity  # the adapter checked it as JSON; compressed bytes would have been a 502
        assert headers["content-type"] == "application/json;charset=utf-8"
        assert "content-encoding" not in headers
        assert headers["content-length"] == str(len(identity))
    assert headers["cache-status"].startswith("ambassador; hit")
    assert len(fake.requests) == 1 and fake.requests[0].headers["accept-encoding"] == "gzip"
    assert counting.compressed == 1


@pytest_twisted.ensureDeferred
async def test_the_config_file_turns_tmdbs_gzip_off(fake_tmdb, tmp_path):
    text = f"adapters:\n  tmdb:\n    type: tmdb\n    base_url: {fake_tmdb.base_url}\n"
    [default] = adapters_from_yaml(tmp_path, text, {"TMDB_API_KEY": "test-api-key"})
    [identity] = adapters_from_yaml(tmp_path, text + "    accept_encoding: identity\n", {"TMDB_API_KEY": "k"})
    assert (default.accept_encoding, identity.accept_encoding) == ("gzip", "identity")


def test_a_bad_accept_encoding_is_one_line_naming_the_key_not_the_value(tmp_path):
    with pytest.raises(ConfigurationError) as raised:
        adapters_from_yaml(tmp_path, api_yaml("https://x.example", "    accept_encoding: brotli-s3cr3t\n"), KEY)
    message = str(raised.value)
    assert message.endswith("adapters.api.accept_encoding: expected identity or gzip")
    assert "s3cr3t" not in message and "\n" not in message


@pytest_twisted.ensureDeferred
async def test_a_decompression_bomb_is_a_502_its_connection_dropped_and_nothing_stored(start_ambassador, tmp_path):
    bomb = gzip.compress(bytes(10 * 1024 * 1024), 9)
    with serving(Encoded(answers=[(None, b"{}"), (None, b"{}"), ("gzip", bomb)])) as fake:
        [adapter] = adapters_from_yaml(tmp_path, api_yaml(fake.base_url, "    accept_encoding: gzip\n"
                                                                         "    policy: {retries: 0}\n"), KEY)
        ambassador = await start_ambassador(adapters=[SmallAPI(**asdict(adapter, recurse=False))])
        for path in ("/api/a", "/api/b"):
            assert (await get(ambassador.url + path))[0] == 200
        status, headers, body = await get(ambassador.url + "/api/bomb")
        assert status == 502
        assert problem_of(headers, body)["type"].endswith("upstream-too-large")
        assert f"more than {CAP} bytes" in problem_of(headers, body)["detail"]
        assert (await get(ambassador.url + "/api/bomb"))[0] == 200  # asked again: nothing was stored
    assert fake.ports[0] == fake.ports[1] == fake.ports[2]  # one kept-alive connection ...
    assert fake.ports[3] != fake.ports[2]  # ... dropped at the cap


@pytest_twisted.ensureDeferred
async def test_a_corrupt_gzip_stream_is_a_502_and_not_stored(start_ambassador, tmp_path):
    corrupt = gzip.compress(b'{"results": []}' * 50)[:40] + b"\x00" * 40
    with serving(Encoded(answers=[("gzip", corrupt)])) as fake:
        adapters = adapters_from_yaml(tmp_path, api_yaml(fake.base_url, "    accept_encoding: gzip\n"
                                                                        "    policy: {retries: 0}\n"), KEY)
        ambassador = await start_ambassador(adapters=adapters)
        status, headers, body = await get(ambassador.url + "/api/things")
        assert status == 502
        problem = problem_of(headers, body)
        assert problem["type"].endswith("upstream-bad-answer")
        assert "a corrupt or truncated gzip stream" in problem["detail"]
        status, headers, body = await get(ambassador.url + "/api/things")
    assert status == 200 and body == b'{"ok": true}'
    assert len(fake.requests) == 2  # the corrupt answer was not kept


@pytest_twisted.ensureDeferred
async def test_an_upstream_that_compresses_unasked_is_decoded_or_refused_never_passed_mislabelled(
        start_ambassador, tmp_path):
    # The http adapter passed a coding it could not read on as JSON, its Content-Encoding dropped.
    with serving(Encoded(answers=[("gzip", gzip.compress(b'{"id": 1}')), ("deflate", b"x\x9c\xab\xae\x05\x00\x01u\x00\xf9"),
                          ("br", b"\x0b\x02\x80{}\x03")])) as fake:
        adapters = adapters_from_yaml(tmp_path, api_yaml(fake.base_url, "    policy: {retries: 0}\n"), KEY)
        ambassador = await start_ambassador(adapters=adapters, cache_bytes=0)
        status, headers, body = await get(ambassador.url + "/api/gzip")
        assert (status, body, headers.get("content-encoding")) == (200, b'{"id": 1}', None)
        for path in ("/api/deflate", "/api/br"):
            status, headers, body = await get(ambassador.url + path)
            assert status == 502, path
            assert "a content coding the ambassador does not decode" in problem_of(headers, body)["detail"]
    assert all("accept-encoding" not in request.headers for request in fake.requests)


class BrotliTMDB(TMDBAdapter):
    accept_encoding = "br"


class BrotliTMDBPlugin(TMDBPlugin):
    def configure(self, environ, reactor):
        return BrotliTMDB(**asdict(super().configure(environ, reactor), recurse=False))


def test_a_plugin_asking_for_a_coding_the_client_cannot_decode_stops_startup():
    discovery = Discovery((BrotliTMDBPlugin(),), ())
    with pytest.raises(ConfigurationError) as raised:
        load_adapters(AdapterSpec(names=["tmdb"], environ={}), reactor, discovery=discovery)
    assert str(raised.value) == "the tmdb adapter's accept_encoding: expected identity or gzip"
