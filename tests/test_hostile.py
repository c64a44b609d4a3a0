"""Hostile input, round two (issue 21): each test holds one item of docs/security.md, over real HTTP."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import pytest_twisted
from twisted.internet import defer

from ambassador.credentials.sources import FILE_POLL_INTERVAL, FileSecret
from ambassador.pipeline.resilience import Policy
from ambassador.testing import FakeAPI
from conftest import adapters_from_yaml, connect_raw, get, header, parse_response, reactor_turns_until, tmdb_env
from processes import run_twistd, spawn_ambassador
from test_client import GOOD, close_after, reset_after, server  # noqa: F401  (server: the fixture)
from test_no_ssrf import assert_problem

KEY = {"TMDB_API_KEY": "test-api-key"}


@pytest_twisted.ensureDeferred
async def test_without_the_token_a_request_is_refused_before_its_body_is_read(fake_tmdb, start_ambassador, tmp_path):
    (tmp_path / "token").write_text("caller-token\n")
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, **KEY), token=FileSecret(str(tmp_path / "token")))
    for framing in (b"Content-Length: 60000\r\n", b"Transfer-Encoding: chunked\r\n"):
        client = await connect_raw(ambassador.url)
        # Only the head: the answer comes without the body's ever being sent.
        client.transport.write(b"POST /movies HTTP/1.1\r\nHost: localhost\r\n" + framing + b"\r\n")
        status, headers, body = parse_response(await client.closed)
        assert_problem(status, headers, body, 401, "unauthorized")
        assert headers["www-authenticate"] == "Bearer" and headers["connection"] == "close"
    assert fake_tmdb.requests == []
    client = await connect_raw(ambassador.url)
    client.transport.write(b"GET /movies HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer caller-token\r\n"
                           b"Connection: close\r\n\r\n")
    assert parse_response(await client.closed)[0] == 200


# Parameters that merely resemble the credential's: any case, spaces, punctuation, brackets, fullwidth forms.
LOOKALIKES = ("API_KEY", "api_key%20%20", "%20api_key", "api.key", "api-key", "api_key[]", "api_key%5B0%5D",
              "Api%20Key", "apikey", "%EF%BD%81pi_key")


@pytest_twisted.ensureDeferred
async def test_tmdb_drops_every_parameter_resembling_its_credential(fake_tmdb, start_ambassador, log_events):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, **KEY), cache_bytes=None)
    query = "&".join(f"{name}=caller-own-key" for name in LOOKALIKES) + "&page=2&api_keys_of=x"
    for path in ("/tmdb/3/movie/550?", "/movies?"):
        response, _ = await get(ambassador.url + path + query)
        assert response.code == 200
    for sent in fake_tmdb.requests:
        assert [(k, v) for k, v in sent.query if k != "page"] == [("api_keys_of", "x"), ("api_key", "test-api-key")]
        assert "caller-own-key" not in repr(sent)
    # the access log redacts them too (conftest.log_events checks every event for the caller's key)


@pytest_twisted.ensureDeferred
async def test_the_http_adapter_drops_every_parameter_resembling_its_credential(serve_fake, start_ambassador, tmp_path):
    fake = FakeAPI(accept=lambda r: r.param("api_key") == "query-secret")
    config = (f"adapters:\n  api:\n    mount: /api\n    base_url: {serve_fake(fake)}\n"
              "    credential: {style: query, param: api_key, secret: {env: QUERY_KEY}}\n")
    ambassador = await start_ambassador(adapters=adapters_from_yaml(tmp_path, config, {"QUERY_KEY": "query-secret"}))
    response, _ = await get(ambassador.url + "/api/x?" + "&".join(f"{n}=caller-own-key" for n in LOOKALIKES) + "&q=1")
    assert response.code == 200
    [sent] = fake.requests
    assert list(sent.query) == [("q", "1"), ("api_key", "query-secret")]


HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nCache-Control: max-age=600\r\n"
MALFORMED = {
    "reset ends a close-delimited body": reset_after(HEAD + b"\r\n" + b'{"results": []}'),
    "shorter than Content-Length": close_after(HEAD + b"Content-Length: 15\r\n\r\n{\"res"),
    "chunked, cut before the last chunk": close_after(HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"res\r\n"),
    "chunk size not hex": close_after(HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"),
    "chunk longer than its size": close_after(HEAD + b"Transfer-Encoding: chunked\r\n\r\n1\r\n{}\r\n0\r\n\r\n"),
    "status not a number": close_after(b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\n{}"),
    "not HTTP": close_after(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"),
    "a header line without a colon": close_after(HEAD + b"Content-Length: 2\r\nno colon\r\n\r\n{}"),
    "two different lengths": close_after(HEAD + b"Content-Length: 2\r\nContent-Length: 15\r\n\r\n{}"),
    "a length that is not a number": close_after(HEAD + b"Content-Length: 2x\r\n\r\n{}"),
    "a coding that is not chunked": close_after(HEAD + b"Transfer-Encoding: rot13\r\n\r\n{}"),
}


@pytest.mark.parametrize("answer", MALFORMED.values(), ids=list(MALFORMED))
@pytest_twisted.ensureDeferred
async def test_a_truncated_or_malformed_answer_is_502_and_never_stored(server, start_ambassador, answer):  # noqa: F811
    upstream = server(answer, default=GOOD)
    ambassador = await start_ambassador({"TMDB_BASE_URL": upstream.url, "TMDB_API_KEY": "test-api-key"},
                                        policies={"tmdb": Policy(retries=0)})
    response, body = await get(ambassador.url + "/movies")
    assert response.code == 502, body
    assert header(response, "content-type") == "application/problem+json"
    response, body = await get(ambassador.url + "/movies")
    assert (response.code, body) == (200, b'{"results": []}')
    assert len(upstream.requests) == 2  # the bad answer was not kept: the second asked the upstream


@pytest_twisted.ensureDeferred
async def test_control_characters_in_an_upstream_header_value_never_reach_the_caller(server, start_ambassador):  # noqa: F811
    dirty = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nETag: \"a\x01b\"\r\n"
             b"Content-Language: en\x7f\r\nCache-Control: max-age=60\x00, public\r\nVary: Accept\x1b[2J\r\n"
             b"Last-Modified: Wed, 21 Oct 2026 07:28:00 GMT\r\n\r\n{}")
    upstream = server(default=dirty)
    ambassador = await start_ambassador({"TMDB_BASE_URL": upstream.url, "TMDB_API_KEY": "test-api-key"})
    client = await connect_raw(ambassador.url)
    client.transport.write(b"GET /movies HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    raw = await client.closed
    head = raw.partition(b"\r\n\r\n")[0]
    assert raw.startswith(b"HTTP/1.1 200 ") and raw.endswith(b"\r\n\r\n{}")
    assert not set(head.replace(b"\r\n", b"")) & (set(range(32)) - {9} | {127})
    _, headers, _ = parse_response(raw)
    assert headers["last-modified"] == "Wed, 21 Oct 2026 07:28:00 GMT"  # the clean one passes
    assert not {"etag", "content-language", "cache-control", "vary"} & set(headers)


def _entry(**changed) -> bytes:
    meta = {"status": 200, "headers": [["content-type", "application/json"]], "stored_at": 1_800_000_000.0,
            "initial_age": 0.0, "lifetime": 600.0, "swr": 0.0, "sie": 0.0, "etag": None, "last_modified": None,
            "vary": [], **changed}
    return json.dumps(meta).encode() + b"\n" + b'{"from": "redis"}'


# What someone with access to Redis could leave under a cache key, by kind.
GARBAGE = [
    ("unreadable", b"not an entry"),
    ("unreadable", b"{}\n{}"),
    ("unreadable", b"[" * 50_000 + b"\n"),  # nested past Python's recursion limit
    ("unreadable", b'{"status": 200}\n'),
    ("invalid-status", _entry(status=999)),
    ("invalid-status", _entry(status="200")),
    ("invalid-status", _entry(status=302)),  # a status the cache never stores
    ("invalid-header", _entry(headers=[["content-type", "application/json\r\nSet-Cookie: a=b"]])),
    ("invalid-header", _entry(headers=[["bad name", "x"]])),
    ("invalid-header", _entry(headers="content-type")),
    ("invalid-header", _entry(headers=[["x-%d" % i, "1"] for i in range(101)])),
    ("invalid-header", _entry(etag='"a\x01b"')),
    ("invalid-header", _entry(vary=[["accept", 5]])),
    ("invalid-time", _entry(lifetime=float("nan"))),
    ("invalid-time", _entry(lifetime="600")),
    ("invalid-time", _entry(initial_age=-5.0)),
    ("oversized", _entry(headers=[["x-pad", "p" * 60_000]])),
]


@pytest_twisted.ensureDeferred
async def test_what_comes_from_redis_is_checked_and_anything_else_is_a_miss_logged_once_per_kind(
        fake_tmdb, start_ambassador, clock, redis_server, log_events):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, **KEY), clock=clock, cache_url=redis_server.url(),
                                        cache_bytes=8 * 40_000, policies={"tmdb": Policy(retries=0)})
    await reactor_turns_until(lambda: ambassador.readiness.cache_store.available)
    response, good = await get(ambassador.url + "/movies")
    assert response.code == 200
    [key] = (await redis_server.cli("--scan")).split()
    assert (await get(ambassador.url + "/movies"))[1] == good  # a hit
    asked = len(fake_tmdb.requests)

    async def served_with(*command) -> bytes:
        await redis_server.cli("DEL", key)
        await redis_server.cli(*command)
        response, body = await get(ambassador.url + "/movies")
        assert response.code == 200 and header(response, "cache-status").startswith("ambassador; fwd=miss")
        return body

    for _, garbage in GARBAGE * 2:
        assert await served_with("SET", key, garbage) == good
    assert await served_with("RPUSH", key, "a", "list") == good  # a key of another type: WRONGTYPE
    assert await served_with("HSET", key, "a", "hash") == good
    assert len(fake_tmdb.requests) == asked + 2 * len(GARBAGE) + 2
    warned = [e["kind"] for e in log_events if "not usable" in e.get("log_format", "")]
    assert sorted(warned) == sorted({kind for kind, _ in GARBAGE} | {"error-reply"})

    # A well-formed entry someone else wrote is served (it is indistinguishable from a replica's).
    await redis_server.cli("SET", key, _entry())
    response, body = await get(ambassador.url + "/movies")
    assert (response.code, body) == (200, b'{"from": "redis"}')


@pytest_twisted.ensureDeferred
async def test_a_secret_file_that_is_a_fifo_is_503_naming_it_until_it_is_fixed(fake_tmdb, start_ambassador, clock,
                                                                              tmp_path):
    path = tmp_path / "api-key"
    os.mkfifo(path)  # reading it would block the whole process
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, TMDB_API_KEY_FILE=str(path)), clock=clock)
    response, body = await get(ambassador.url + "/movies")
    document = assert_problem(response.code, {"content-type": header(response, "content-type")}, body, 503,
                              "credential-missing")
    assert f"file {path} is not a regular file" in document["detail"]
    for damage in (b"\xff\xfe not UTF-8", b"a" * 100_000):  # the poll survives whatever the file holds
        path.unlink()
        path.write_bytes(damage)
        clock.advance(FILE_POLL_INTERVAL)
        assert (await get(ambassador.url + "/movies"))[0].code == 503
    path.write_text("test-api-key\n")
    clock.advance(FILE_POLL_INTERVAL)
    response, _ = await get(ambassador.url + "/movies")
    assert response.code == 200 and fake_tmdb.requests[-1].param("api_key") == "test-api-key"


PASTED = "sk-live-4f9aPASTEDKEY"  # a value typed where a setting goes: no message may repeat it


@pytest_twisted.ensureDeferred
async def test_bad_startup_input_is_one_line_naming_the_setting_never_the_value_nor_a_hang(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "directory").mkdir()
    (tmp_path / "latin-1").write_bytes(b"caf\xe9-token")

    def config(text: str) -> str:
        path = tmp_path / f"config-{abs(hash(text))}.yaml"
        path.write_text("adapters:\n  api:\n    mount: /api\n    base_url: http://127.0.0.1:9\n" + text)
        return str(path)

    cases = {  # arguments: what the one line must say
        ("--require-token-file", str(tmp_path / "fifo")): f"{tmp_path / 'fifo'} is not a regular file",
        ("--require-token-file", str(tmp_path / "directory")): f"{tmp_path / 'directory'} is not a regular file",
        ("--require-token-file", str(tmp_path / "latin-1")): f"{tmp_path / 'latin-1'} is not UTF-8 text",
        ("--require-token-file", str(tmp_path / "absent")): f"{tmp_path / 'absent'} cannot be read",
        ("--port", PASTED): "--port: expected a port number or an endpoint description",
        ("--admin-port", f"tcp:{PASTED}"): "--admin-port: expected a port number or an endpoint description",
        ("--config", config(f"    credential: {{style: bearer, secret: {{env: {PASTED}}}}}\n")):
            "credential.secret: expected {env: VARIABLE} with VARIABLE an environment variable name",
        ("--config", config(f"    {PASTED}: 1\n    credential: {{style: bearer, secret: {{env: K}}}}\n")):
            "adapters.api.(a key not shown): expected no such key here",
        ("--config", config(f"    timeout: {PASTED}\n    credential: {{style: bearer, secret: {{env: K}}}}\n")):
            "adapters.api.timeout: expected a positive number of seconds",
        ("--config", config(f"    timeout: *{PASTED}\n")): "not valid YAML at line 5, column 14: found undefined alias",
    }
    runs = [defer.ensureDeferred(run_twistd("-n", "ambassador", "--port", "0", *args, env={}, cwd=tmp_path))
            for args in cases]
    for (args, expected), (output, code) in zip(cases.items(), await defer.gatherResults(runs)):
        lines = [line for line in output.splitlines() if line.strip()]
        assert code != 0 and expected in lines[-1], (args, output)
        assert "Traceback" not in output and PASTED not in output and "caf" not in output


def memory_mib(pid: int, field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of a process, in MiB."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024


async def answered_within(url: str) -> float:
    started = time.monotonic()
    response, _ = await get(url)
    assert response.code == 200
    return time.monotonic() - started


CONNECTIONS = 60  # flooding each port (120 in all); a quarter as many more hold what they may


@pytest_twisted.ensureDeferred
async def test_tiny_chunk_bodies_on_both_ports_cost_memory_by_their_bytes_and_others_are_still_answered(
        fake_tmdb, tmp_path):
    process = spawn_ambassador("--port", "0", "--admin-port", "tcp:0:interface=127.0.0.1", "--max-connections", "300",
                               "--read-timeout", "5", env=tmdb_env(fake_tmdb, TMDB_API_KEY="test-api-key"),
                               cwd=tmp_path)
    try:
        url = f"http://127.0.0.1:{await process.listening}"
        admin_url = f"http://127.0.0.1:{await process.admin_listening}"
        assert (await get(url + "/movies"))[0].code == 200  # from now on a cache hit
        assert (await get(admin_url + "/healthz"))[0].code == 200
        pid = process.transport.pid
        before = memory_mib(pid, "VmRSS")
        head = b"POST /movies HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
        # Floods: 30 000 bytes of one-byte chunks each, never ending. Holders: 700 one-byte chunks (3500 bytes
        # of framing, within the bound) and then nothing: each is kept until the read deadline.
        flooding = [await connect_raw(base) for base in (url, admin_url) for _ in range(CONNECTIONS)]
        holding = [await connect_raw(base) for base in (url, admin_url) for _ in range(CONNECTIONS // 4)]
        for client in flooding:
            client.transport.write(head + b"1\r\na\r\n" * 6000)
        for client in holding:
            client.transport.write(head + b"1\r\na\r\n" * 700)
        # While the ambassador reads them all, other callers are answered (a behaviour bound, not a benchmark).
        waits = [await answered_within(url + "/movies"), await answered_within(admin_url + "/healthz")]
        assert max(waits) < 2.0, waits
        assert {parse_response(await client.closed)[0] for client in flooding} == {413}  # refused early
        assert {parse_response(await client.closed)[0] for client in holding} == {408}  # at the read deadline
        grown = memory_mib(pid, "VmHWM") - before
        sent = (len(flooding) * (len(head) + 30_000) + len(holding) * (len(head) + 3500)) / 2**20
        print(f"\n{len(flooding) + len(holding)} tiny-chunk bodies, {sent:.1f} MiB sent: peak RSS grew "
              f"{grown:.1f} MiB; answered in {waits[0] * 1000:.0f} ms, {waits[1] * 1000:.0f} ms")
        assert grown < 2 * sent + 16  # in proportion to the bytes (27x before twisted.web)
        assert (await get(url + "/movies"))[0].code == 200
    finally:
        process.transport.signalProcess(signal.SIGTERM)
        await process.ended


@pytest_twisted.ensureDeferred
async def test_an_upstream_answer_in_tiny_chunks_costs_memory_by_its_bytes(server, tmp_path):  # noqa: F811
    body = b"[" + b" " * (2**20 - 2) + b"]"
    chunked = b"".join(b"2\r\n" + body[i:i + 2] + b"\r\n" for i in range(0, len(body), 2)) + b"0\r\n\r\n"
    upstream = server(default=b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                              b"\r\n" + chunked)
    process = spawn_ambassador("--port", "0", "--admin-port", "none", "--no-cache",
                               env={"TMDB_BASE_URL": upstream.url, "TMDB_API_KEY": "test-api-key"}, cwd=tmp_path)
    try:
        url = f"http://127.0.0.1:{await process.listening}"
        pid = process.transport.pid
        before = memory_mib(pid, "VmRSS")
        response, answered = await get(url + "/movies")
        assert response.code == 200 and answered == body
        grown = memory_mib(pid, "VmHWM") - before
        print(f"\na 1 MiB answer in 2-byte chunks: peak RSS grew {grown:.1f} MiB")
        assert grown < 8  # a few copies of the body (70x before twisted.web)
    finally:
        process.transport.signalProcess(signal.SIGTERM)
        await process.ended


FORGED = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{"forged": "1"}'


@pytest.mark.parametrize("how", ["after the answer, in the same write", "while idle in the pool"])
@pytest_twisted.ensureDeferred
async def test_bytes_a_pooled_upstream_connection_sends_unasked_never_reach_a_caller(server, start_ambassador, how):  # noqa: F811
    def answer_then_forge(protocol):
        protocol.transport.write(GOOD + (FORGED if how.startswith("after") else b""))

    upstream = server(answer_then_forge, default=GOOD)
    ambassador = await start_ambassador({"TMDB_BASE_URL": upstream.url, "TMDB_API_KEY": "test-api-key"},
                                        cache_bytes=None, policies={"tmdb": Policy(retries=0)})
    response, body = await get(ambassador.url + "/tmdb/3/movie/1")
    assert (response.code, body) == (200, b'{"results": []}')
    if how.startswith("while"):
        upstream.connections[0].transport.write(FORGED)
        await reactor_turns_until(lambda: len(upstream.closed) == 1)  # the ambassador dropped that connection
    # Read in the answer's own write, Twisted's parser discards them (its finisher ignores what follows an
    # answer) and the connection stays in the pool: the next request on it gets the upstream's next answer.
    for n in range(2, 5):
        response, body = await get(ambassador.url + f"/tmdb/3/movie/{n}")
        assert (response.code, body) == (200, b'{"results": []}')
    assert len(upstream.requests) == 4
