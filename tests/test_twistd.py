"""`twistd -n ambassador` as a real process, exactly as the README starts it."""

import json
import re
import shlex
import signal
from pathlib import Path
from urllib.parse import quote

import pytest
import pytest_twisted
from twisted.internet import defer

from conftest import SECRETS, connect_raw, get, parse_response, raw_exchange, tmdb_env
from processes import run_twistd, spawn_ambassador


@pytest_twisted.ensureDeferred
async def test_readme_command_serves_and_never_logs_the_key(fake_tmdb, tmp_path):
    process = spawn_ambassador("--port", "0", "--admin-port", "0",
                               env=tmdb_env(fake_tmdb, TMDB_API_KEY="test-api-key"), cwd=tmp_path)
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
        response, _ = await get(url + "/movies?page=2")  # not cached yet
        assert response.code == 502
        assert fake_tmdb.requests[0].param("api_key") == "test-api-key"
    finally:
        process.transport.signalProcess(signal.SIGTERM)
    log = process.output.decode()
    assert await process.ended == (0, None), log
    assert "ambassador proxy listening on 127.0.0.1:" in log
    assert "reactor class: twisted.internet." in log  # twistd's own choice, as for any twistd plugin
    assert "GET /tmdb/3/movie/550?api_key=[REDACTED]" in log
    for secret in SECRETS:
        assert secret not in log
    assert "Traceback" not in log


@pytest_twisted.ensureDeferred
async def test_help_documents_every_option_and_variable_without_values(tmp_path):
    output, code = await run_twistd("ambassador", "--help", env={"TMDB_API_KEY": "test-api-key"}, cwd=tmp_path)
    assert code == 0
    for word in ["--port", "--timeout", "--connect-timeout", "127.0.0.1", "unix:", "--list-adapters", "--adapter",
                 "--mount", "NAME.ROUTE=/path", "--plugin-dir", "AMBASSADOR_PLUGIN_DIRS", "--max-connections",
                 "--idle-timeout", "--read-timeout", "--require-token-file", "TMDB_API_KEY",
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
    assert "TMDB_BASE_URL: expected a URL like https://api.example.com" in output
    assert "ftp://" not in output
    assert "Traceback" not in output

    output, code = await run_twistd("-n", "ambassador", "--timeout", "-1", env={}, cwd=tmp_path)
    assert code != 0 and "timeout must be a number of seconds" in output

    output, code = await run_twistd("-n", "ambassador", "--require-token-file", str(tmp_path / "absent"), env={},
                                    cwd=tmp_path)
    assert code != 0 and f"--require-token-file: {tmp_path / 'absent'} cannot be read" in output
    assert "Traceback" not in output


@pytest_twisted.ensureDeferred
async def test_binding_beyond_loopback_warns(fake_tmdb, tmp_path):
    process = spawn_ambassador("--port", "tcp:0:interface=0.0.0.0", "--admin-port", "none",
                               env=tmdb_env(fake_tmdb, TMDB_API_KEY="test-api-key"), cwd=tmp_path)
    try:
        await process.listening
    finally:
        process.transport.signalProcess(signal.SIGTERM)
    assert await process.ended == (0, None)
    assert "which is not loopback" in process.output.decode()


@pytest_twisted.ensureDeferred
async def test_a_reactor_chosen_with_twistd_r_is_used(fake_tmdb, tmp_path):
    process = spawn_ambassador("--port", "0", "--admin-port", "none", twistd_options=["-r", "poll"],
                               env=tmdb_env(fake_tmdb, TMDB_API_KEY="test-api-key"), cwd=tmp_path)
    try:
        port = await process.listening
        response, _ = await get(f"http://127.0.0.1:{port}/movies")
        assert response.code == 200
    finally:
        process.transport.signalProcess(signal.SIGTERM)
    assert await process.ended == (0, None)
    assert "reactor class: twisted.internet.pollreactor.PollReactor." in process.output.decode()


@pytest_twisted.ensureDeferred
async def test_json_log_format_writes_one_json_object_per_line(fake_tmdb, tmp_path):
    process = spawn_ambassador("--port", "0", "--admin-port", "none", "--log-format", "json",
                               env=tmdb_env(fake_tmdb, TMDB_API_KEY="test-api-key"), cwd=tmp_path)
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


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest_twisted.ensureDeferred
async def test_a_caller_cannot_break_or_forge_a_log_line(fake_tmdb, tmp_path, log_format):
    process = spawn_ambassador("--port", "0", "--admin-port", "none", "--log-format", log_format,
                               env=tmdb_env(fake_tmdb, TMDB_API_KEY="test-api-key"), cwd=tmp_path)
    forged = "x\r\n2026-01-01T00:00:00+0000 [ambassador.access#info] GET /forged 200\x1b[2J\u009b\u2028"
    try:
        port = await process.listening
        await get(f"http://127.0.0.1:{port}/movies?with_genres={quote(forged)}")
    finally:
        process.transport.signalProcess(signal.SIGTERM)
    assert await process.ended == (0, None)
    output = process.output.decode()
    lines = output.splitlines()
    [access] = [line for line in lines if "with_genres=" in line]
    assert not any(c in output for c in "\r\x1b\x9b\u2028")
    assert not any(line.startswith("2026-01-01") for line in lines)
    if log_format == "text":
        assert ("] GET /movies?with_genres=x\\r\\n2026-01-01T00:00:00+0000 [ambassador.access#info] GET /forged "
                "200\\x1b[2J\\x9b\\u2028 ") in access
        assert "None" not in access
    else:
        assert json.loads(access)["path"] == "/movies?with_genres=" + forged


def memory_mib(pid: int, field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of a process, in MiB."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024


@pytest_twisted.ensureDeferred
async def test_memory_stays_bounded_under_abuse(fake_tmdb, tmp_path):
    process = spawn_ambassador("--port", "0", "--admin-port", "none", "--max-connections", "300",
                               "--read-timeout", "2", env=tmdb_env(fake_tmdb, TMDB_API_KEY="test-api-key"),
                               cwd=tmp_path)
    try:
        url = f"http://127.0.0.1:{await process.listening}"
        assert (await get(url + "/movies"))[0].code == 200
        pid = process.transport.pid
        baseline = memory_mib(pid, "VmRSS")

        # Slowloris: as many connections as allowed, none finishing its headers; more are refused at once.
        slow = [await connect_raw(url) for _ in range(300)]
        for client in slow:
            client.transport.write(b"GET /movies HTTP/1.1\r\nX-Slow: ")
        refused = [parse_response(await (await connect_raw(url)).closed)[0] for _ in range(100)]
        assert set(refused) == {503}
        assert {parse_response(await client.closed)[0] for client in slow} == {408}  # after --read-timeout

        after_slowloris = memory_mib(pid, "VmHWM")

        # Megabytes of request line, headers and bodies, 50 connections at once.
        request = b"GET /movies HTTP/1.1\r\nHost: localhost\r\n"
        abuse = [b"GET /" + b"a" * 2**20 + b" HTTP/1.1\r\n\r\n",
                 request + b"X-Long: " + b"a" * 2**20 + b"\r\n\r\n",
                 request + b"X-Many: 1\r\n" * 100_000 + b"\r\n",
                 request + b"Content-Length: 1000000000\r\n\r\n" + b"a" * 2**20,
                 request + b"Transfer-Encoding: chunked\r\n\r\n" + (b"10000\r\n" + b"a" * 2**16 + b"\r\n") * 16]
        answers = await defer.gatherResults([defer.ensureDeferred(raw_exchange(url, data)) for data in abuse * 10])
        assert [status for status, _, _ in answers] == [414, 431, 431, 413, 413] * 10
        after_requests = memory_mib(pid, "VmHWM")

        # Four upstream answers of 30 MB at once: each is cut off at 10 MiB.
        fake_tmdb.canned = (200, {"Content-Type": "application/json"}, b"[" + b" " * (30 * 2**20) + b"]")
        answers = await defer.gatherResults([defer.ensureDeferred(get(url + "/tmdb/3/movie/550")) for _ in range(4)])
        assert {response.code for response, _ in answers} == {502}
        fake_tmdb.canned = None
        assert (await get(url + "/movies"))[0].code == 200  # still serving
        peak = memory_mib(pid, "VmHWM")

        print(f"\nambassador memory (MiB): {baseline:.1f} after start; peak {after_slowloris:.1f} after slowloris, "
              f"{after_requests:.1f} after oversized requests, {peak:.1f} after oversized upstream answers")
        assert after_requests - baseline < 24  # connections and requests are bounded: a few MiB at most
        assert peak - after_requests < 4 * 10 * 1.5 + 8  # four capped answers in flight
        assert peak < 128  # the pod's memory limit (pod.yaml)
    finally:
        process.transport.signalProcess(signal.SIGTERM)
    assert await process.ended == (0, None)


@pytest_twisted.ensureDeferred
async def test_a_listener_that_cannot_bind_stops_startup_in_one_line(fake_tmdb, tmp_path):
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory

    taken = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    busy = taken.getHost().port
    try:
        cases = [(["--port", str(busy)], f"--port: cannot listen on 127.0.0.1:{busy}: Address already in use"),
                 (["--port", "0", "--admin-port", f"tcp:{busy}:interface=127.0.0.1"],
                  f"--admin-port: cannot listen on 127.0.0.1:{busy}: Address already in use"),
                 (["--port", "tcp:99999"], "--port: cannot listen: bind(): port must be 0-65535."),
                 (["--port", f"unix:{tmp_path}/absent/amb.sock"], "--port: cannot listen: No such file or directory")]
        for args, line in cases:
            output, code = await run_twistd("-n", "ambassador", *args, env=tmdb_env(fake_tmdb, **{"TMDB_API_KEY": "k"}),
                                            cwd=tmp_path)
            assert code == 1, output
            assert [text for text in output.splitlines() if "#critical" in text][0].endswith(line)
            assert "Traceback" not in output and "listening on" not in output
            assert not (tmp_path / "twistd.pid").exists()  # removed, as twistd does on a clean stop
    finally:
        taken.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_usage_error_prints_its_line_and_a_pointer_not_the_help(tmp_path):
    for args, line in [(["--port", "abc"], "--port: expected a port number or an endpoint description"),
                       (["--port", "127.0.0.1:8080"], "--port: expected a port number or an endpoint description"),
                       (["--admin-port", "abc"], "--admin-port: expected a port number or an endpoint description"),
                       (["--port", "tcp:not-a-port"], "--port: expected a port number"),
                       (["--nope"], "option --nope not recognized"),
                       (["--timeout", "abc"], "--timeout must be a number of seconds")]:
        output, code = await run_twistd("-n", "ambassador", *args, env={"COLUMNS": "wide"}, cwd=tmp_path)
        assert code == 1, output
        assert line in output
        assert "twistd ambassador --help lists every option" in output
        assert "--max-connections" not in output and len(output.splitlines()) <= 3  # not the 130-line help
        assert "Traceback" not in output and "abc" not in output.replace("--nope", "")
    output, code = await run_twistd("ambassador", "--help", env={"COLUMNS": "wide"}, cwd=tmp_path)
    assert code == 0 and "--max-connections" in output and "Traceback" not in output


def readme_run_command() -> str:
    """The README's install-and-run command: the first sh block after "Install and run"."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    return re.search(r"Install and run \(.*?```sh\n(.*?)\n```", readme, re.S).group(1)


def test_the_readme_command_pastes_into_a_shell():
    command = readme_run_command()
    assert "\n" not in command
    words = list(shlex.shlex(command, posix=True, punctuation_chars=True))
    assert not {"<", ">", ">>", "|"} & set(words)  # no placeholder the shell reads as a redirection
    assert words[:4] == ["python3", "-m", "venv", ".venv"]  # PEP 668: never a bare pip install
    assert words.count("&&") == 2 and ".venv/bin/pip" in words and ".venv/bin/twistd" in words


@pytest_twisted.ensureDeferred
async def test_the_readme_command_started_twice_in_one_directory(fake_tmdb, tmp_path):
    """The command's twistd part, twice at once in one directory (each on a port of its own): no pid
    file to collide on, both serve."""
    words = shlex.split(readme_run_command().rsplit("&&", 1)[1])
    environ = dict(word.split("=", 1) for word in words if re.match(r"[A-Z_]+=", word))
    twistd_options = words[words.index(".venv/bin/twistd") + 1:words.index("ambassador")]
    assert twistd_options[0] == "-n"  # spawn_ambassador gives -n itself
    fake_tmdb.api_keys.add(environ["TMDB_API_KEY"])
    processes = [spawn_ambassador("--port", "0", "--admin-port", "none", twistd_options=twistd_options[1:],
                                  env=tmdb_env(fake_tmdb, **environ), cwd=tmp_path) for _ in range(2)]
    try:
        for process in processes:
            response, _ = await get(f"http://127.0.0.1:{await process.listening}/movies")
            assert response.code == 200
        assert fake_tmdb.requests[0].param("api_key") == environ["TMDB_API_KEY"]
        assert not (tmp_path / "twistd.pid").exists()
    finally:
        for process in processes:
            process.transport.signalProcess(signal.SIGTERM)
    for process in processes:
        assert await process.ended == (0, None), process.output.decode()
