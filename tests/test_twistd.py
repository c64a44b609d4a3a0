"""`twistd -n ambassador` as a real process, exactly as the README starts it."""

import json
import os
import re
import signal
import sys

import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.utils import getProcessOutputAndValue

from conftest import SECRETS, get, tmdb_env

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
BASE_ENV = {"PATH": os.environ.get("PATH", ""), "PYTHONUNBUFFERED": "1"}


class Twistd(protocol.ProcessProtocol):
    """Collects all output; ``listening`` fires with the port the log line announces."""

    def __init__(self) -> None:
        self.output = b""
        self.listening = defer.Deferred()
        self.admin_listening = defer.Deferred()
        self.ended = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        for label, listening in ((b"proxy", self.listening), (b"admin", self.admin_listening)):
            found = re.search(rb"ambassador %s listening on [\d.]+:(\d+)" % label, self.output)
            if found and not listening.called:
                listening.callback(int(found.group(1)))

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        if not self.listening.called:
            self.listening.errback(RuntimeError(self.output.decode()))
        self.ended.callback((reason.value.exitCode, reason.value.signal))


async def run_twistd(*args, env, cwd):
    out, err, code = await getProcessOutputAndValue(TWISTD, args, env={**BASE_ENV, **env}, path=str(cwd))
    return (out + err).decode(), code


@pytest_twisted.ensureDeferred
async def test_readme_command_serves_and_never_logs_the_key(fake_tmdb, tmp_path):
    process = Twistd()
    env = {**BASE_ENV, **tmdb_env(fake_tmdb, TMDB_API_KEY="test-api-key")}
    reactor.spawnProcess(process, TWISTD, [TWISTD, "-n", "ambassador", "--port", "0", "--admin-port", "0"], env=env, path=str(tmp_path))
    try:
        port = await process.listening
        url = f"http://127.0.0.1:{port}"
        response, body = await get(url + "/movies")
        assert response.code == 200 and b"Fight Club" in body
        response, _ = await get(url + "/tmdb/3/movie/550?api_key=caller-own-key")
        assert response.code == 200
        response, _ = await get(url + "/tmdb/3/movie/1")
        assert response.code == 404
        fake_tmdb.fault = "reset"
        response, _ = await get(url + "/movies")
        assert response.code == 502
        assert fake_tmdb.requests[0].param("api_key") == "test-api-key"
    finally:
        process.transport.signalProcess(signal.SIGTERM)
    log = process.output.decode()
    assert await process.ended == (0, None), log
    assert "ambassador proxy listening on 127.0.0.1:" in log
    assert "GET /tmdb/3/movie/550?api_key=[REDACTED]" in log
    for secret in SECRETS:
        assert secret not in log
    assert "Traceback" not in log


@pytest_twisted.ensureDeferred
async def test_help_documents_every_option_and_variable_without_values(tmp_path):
    output, code = await run_twistd("ambassador", "--help", env={"TMDB_API_KEY": "test-api-key"}, cwd=tmp_path)
    assert code == 0
    for word in ["--port", "--timeout", "--connect-timeout", "127.0.0.1", "unix:", "TMDB_API_KEY",
                 "TMDB_API_KEY_FILE", "TMDB_READ_ACCESS_TOKEN", "TMDB_READ_ACCESS_TOKEN_FILE", "API_KEY",
                 "TMDB_BASE_URL", "--config", "base_url:", "paths:", "style: query | header | bearer | basic | oauth2",
                 "token_url:", "client_auth:", "{file: /path}"]:
        assert word in output
    assert "test-api-key" not in output


@pytest_twisted.ensureDeferred
async def test_bad_configuration_stops_startup_with_a_clear_message(tmp_path):
    output, code = await run_twistd("-n", "ambassador", "--port", "0",
                                    env={"TMDB_BASE_URL": "ftp://tmdb.example/path"}, cwd=tmp_path)
    assert code != 0
    assert "TMDB_BASE_URL must look like https://host" in output
    assert "Traceback" not in output

    output, code = await run_twistd("-n", "ambassador", "--timeout", "-1", env={}, cwd=tmp_path)
    assert code != 0 and "timeout must be a number of seconds" in output


@pytest_twisted.ensureDeferred
async def test_binding_beyond_loopback_warns(fake_tmdb, tmp_path):
    process = Twistd()
    env = {**BASE_ENV, **tmdb_env(fake_tmdb, TMDB_API_KEY="test-api-key")}
    reactor.spawnProcess(process, TWISTD, [TWISTD, "-n", "ambassador", "--port", "tcp:0:interface=0.0.0.0",
                                              "--admin-port", "none"],
                         env=env, path=str(tmp_path))
    try:
        await process.listening
    finally:
        process.transport.signalProcess(signal.SIGTERM)
    assert await process.ended == (0, None)
    assert "which is not loopback" in process.output.decode()


@pytest_twisted.ensureDeferred
async def test_json_log_format_writes_one_json_object_per_line(fake_tmdb, tmp_path):
    process = Twistd()
    env = {**BASE_ENV, **tmdb_env(fake_tmdb, TMDB_API_KEY="test-api-key")}
    reactor.spawnProcess(process, TWISTD, [TWISTD, "-n", "ambassador", "--port", "0", "--admin-port", "none",
                                           "--log-format", "json"], env=env, path=str(tmp_path))
    try:
        port = await process.listening
        await get(f"http://127.0.0.1:{port}/movies?api_key=caller-own-key", headers={"X-Request-ID": "json-1"})
    finally:
        process.transport.signalProcess(signal.SIGTERM)
    assert await process.ended == (0, None)
    lines = process.output.decode().splitlines()
    events = [json.loads(line) for line in lines]  # every line is JSON
    [access] = [e for e in events if e["logger"] == "ambassador.access"]
    assert access["request_id"] == "json-1"
    assert access["path"] == "/movies?api_key=[REDACTED]"
    for field in ("time", "level", "adapter", "method", "route", "status", "upstream_status", "attempts",
                  "cache", "duration_ms"):
        assert field in access
    assert (access["status"], access["upstream_status"], access["route"]) == (200, 200, "movies")
    for secret in SECRETS:
        assert secret not in process.output.decode()
