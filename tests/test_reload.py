"""SIGHUP reloads --config, the credential files and --plugin-dir: built and validated first, then
swapped in for new requests, requests in flight finishing on the old configuration."""

import json
import signal

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock

from ambassador.app.reload import load_adapters
from ambassador.app.settings import AdapterSpec
from ambassador.testing import FakeAPI
from conftest import get, reactor_turns_until, tmdb_env
from processes import spawn_ambassador
from test_admin import samples
from test_plugins import FILMS_DROPIN

TMDB_ONLY = "adapters:\n  tmdb: {{type: tmdb, base_url: '{tmdb}'}}\n"
API_ONLY = ("adapters:\n  api:\n    mount: /api\n    base_url: '{api}'\n"
            "    credential: {{style: bearer, secret: {{env: API_TOKEN}}}}\n")


async def start_from_file(start_ambassador, path, environ, **settings):
    spec = AdapterSpec(config=str(path), environ=environ)
    loaded = load_adapters(spec, reactor)
    return await start_ambassador(adapters=loaded.adapters, policies=loaded.policies, spec=spec, **settings)


def reloads(exposition: bytes, outcome: str) -> float:
    return samples(exposition)[("ambassador_reloads_total", frozenset({("outcome", outcome)}))]


@pytest_twisted.ensureDeferred
async def test_a_reload_serves_new_requests_while_those_in_flight_finish_on_the_old(
        fake_tmdb, serve_fake, start_ambassador, tmp_path):
    api = FakeAPI(accept=lambda r: r.headers.get("authorization") == "Bearer bearer-secret")
    api_url = serve_fake(api)
    config = tmp_path / "ambassador.yaml"
    config.write_text(TMDB_ONLY.format(tmdb=fake_tmdb.base_url))
    ambassador = await start_from_file(start_ambassador, config,
                                       {"TMDB_API_KEY": "test-api-key", "API_TOKEN": "bearer-secret"})
    assert (await get(ambassador.url + "/api/x"))[0].code == 404
    fake_tmdb.fault = "hang"
    sent = fake_tmdb.next_request()
    in_flight = ensureDeferred(get(ambassador.url + "/movies"))
    await sent

    config.write_text(API_ONLY.format(api=api_url))  # TMDB is no longer served; an API is
    assert ambassador.reloader is not None and ambassador.reloader.reload() is True
    response, body = await get(ambassador.url + "/api/x")
    assert response.code == 200 and json.loads(body)["path"] == "/x"
    assert (await get(ambassador.url + "/movies"))[0].code == 404  # new requests: the new configuration
    fake_tmdb.fault = None
    fake_tmdb.release()
    response, body = await in_flight  # routed before the reload: finished by the old TMDB adapter
    assert response.code == 200 and b"Fight Club" in body
    _, exposition = await get(ambassador.admin_url + "/metrics")
    assert (reloads(exposition, "ok"), reloads(exposition, "error")) == (1, 0)
    response, body = await get(ambassador.admin_url + "/readyz")
    assert response.code == 200 and list(json.loads(body)["adapters"]) == ["api"]


@pytest_twisted.ensureDeferred
async def test_an_invalid_file_keeps_the_running_configuration_and_says_where(
        fake_tmdb, start_ambassador, tmp_path, log_events):
    config = tmp_path / "ambassador.yaml"
    config.write_text(TMDB_ONLY.format(tmdb=fake_tmdb.base_url))
    ambassador = await start_from_file(start_ambassador, config, {"TMDB_API_KEY": "test-api-key"})
    # A pasted secret where a word belongs: the log line names file and key, never the value.
    config.write_text("adapters:\n  w:\n    mount: /w\n    base_url: https://x.example\n"
                      "    credential: {style: test-weather-key, secret: {env: K}}\n")
    assert ambassador.reloader is not None and ambassador.reloader.reload() is False
    [line] = [e for e in log_events if "Reload failed" in e.get("log_format", "")]
    assert line["log_level"].name == "error"
    assert f"{config}: adapters.w.credential.style: expected" in line["error"]
    assert (await get(ambassador.url + "/movies"))[0].code == 200  # still the old configuration
    response, body = await get(ambassador.admin_url + "/readyz")
    report = json.loads(body)
    assert response.code == 200 and "the last reload failed" in report["warnings"][0]
    assert "test-weather-key" not in body.decode()
    _, exposition = await get(ambassador.admin_url + "/metrics")
    assert (reloads(exposition, "ok"), reloads(exposition, "error")) == (0, 1)

    config.write_text(TMDB_ONLY.format(tmdb=fake_tmdb.base_url))  # fixed: the warning goes
    assert ambassador.reloader.reload() is True
    assert "warnings" not in json.loads((await get(ambassador.admin_url + "/readyz"))[1])


@pytest_twisted.ensureDeferred
async def test_a_reload_reads_the_credential_files_again_at_once(fake_tmdb, start_ambassador, tmp_path):
    clock = Clock()  # never advanced: the file is not polled, the reload reads it
    key = tmp_path / "key"
    key.write_text("test-api-key")
    config = tmp_path / "ambassador.yaml"
    config.write_text(TMDB_ONLY.format(tmdb=fake_tmdb.base_url))
    ambassador = await start_from_file(start_ambassador, config, {"TMDB_API_KEY_FILE": str(key)}, clock=clock)
    fake_tmdb.api_keys.add("rotated-api-key")
    key.write_text("rotated-api-key")
    assert ambassador.reloader is not None and ambassador.reloader.reload() is True
    assert (await get(ambassador.url + "/movies"))[0].code == 200
    assert fake_tmdb.requests[-1].param("api_key") == "rotated-api-key"


def stop(process) -> None:
    process.transport.signalProcess(signal.SIGTERM)


@pytest_twisted.ensureDeferred
async def test_sighup_reloads_the_config_file_and_plugin_dir_of_a_running_twistd(fake_tmdb, tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    config = tmp_path / "ambassador.yaml"
    config.write_text(TMDB_ONLY.format(tmdb=fake_tmdb.base_url))
    process = spawn_ambassador("--port", "0", "--admin-port", "none", "--config", str(config),
                               "--plugin-dir", str(plugins), env=tmdb_env(fake_tmdb, TMDB_API_KEY="test-api-key"),
                               cwd=tmp_path)
    try:
        url = f"http://127.0.0.1:{await process.listening}"
        assert (await get(url + "/films"))[0].code == 404
        (plugins / "films.py").write_text(FILMS_DROPIN)  # a new dropin, and the file serving it
        config.write_text(TMDB_ONLY.format(tmdb=fake_tmdb.base_url) + "  films: {type: films}\n")
        process.transport.signalProcess(signal.SIGHUP)
        await reactor_turns_until(lambda: b"Reloaded the configuration" in process.output)
        assert [(await get(url + path))[0].code for path in ("/films", "/movies")] == [200, 200]

        config.write_text("adapters: [not, a, mapping]\n")
        process.transport.signalProcess(signal.SIGHUP)
        await reactor_turns_until(lambda: b"Reload failed" in process.output)
        assert (await get(url + "/films"))[0].code == 200  # the running configuration stayed
    finally:
        stop(process)
    assert await process.ended == (0, None)  # SIGHUP never ends it; SIGTERM still stops it cleanly
    log = process.output.decode()
    [failed] = [line for line in log.splitlines() if "Reload failed" in line]
    assert f"{config}: adapters" in failed and "Traceback" not in log


@pytest_twisted.ensureDeferred
async def test_sighup_to_the_primary_reloads_every_worker(fake_tmdb, tmp_path):
    config = tmp_path / "ambassador.yaml"
    config.write_text(TMDB_ONLY.format(tmdb=fake_tmdb.base_url))
    process = spawn_ambassador("--port", "0", "--admin-port", "tcp:0:interface=127.0.0.1", "--workers", "2",
                               "--config", str(config), env=tmdb_env(fake_tmdb, TMDB_API_KEY="test-api-key"),
                               cwd=tmp_path)
    try:
        admin = f"http://127.0.0.1:{await process.admin_listening}"
        await reactor_turns_until(lambda: b"worker 1 proxy listening" in process.output)
        process.transport.signalProcess(signal.SIGHUP)
        await reactor_turns_until(lambda: process.output.count(b"Reloaded the configuration") == 2)
        _, exposition = await get(admin + "/metrics")
        values = samples(exposition)
        for worker in ("0", "1"):
            assert values[("ambassador_reloads_total", frozenset({("outcome", "ok"), ("worker", worker)}))] == 1
    finally:
        stop(process)
    assert await process.ended == (0, None)


@pytest_twisted.ensureDeferred
async def test_the_old_configuration_is_retired_once_no_exchange_of_it_can_be_running(
        fake_tmdb, start_ambassador, tmp_path):
    from ambassador.credentials.sources import FILE_POLL_INTERVAL

    clock = Clock()
    key = tmp_path / "key"
    key.write_text("test-api-key")
    config = tmp_path / "ambassador.yaml"
    config.write_text(f"adapters:\n  tmdb:\n    type: tmdb\n    base_url: '{fake_tmdb.base_url}'\n    timeout: 5\n")
    ambassador = await start_from_file(start_ambassador, config, {"TMDB_API_KEY_FILE": str(key)}, clock=clock)
    assert ambassador.wiring.current is not None
    [old] = ambassador.wiring.current.adapters
    assert ambassador.wiring.current.guards["tmdb"].policy.timeout == 5
    assert ambassador.reloader is not None and ambassador.reloader.reload() is True
    # Requests in flight may still take the old credential for up to their deadline (5 s): it is kept fresh.
    key.write_text("rotated-api-key")
    clock.advance(FILE_POLL_INTERVAL)
    assert old.credential.reloads() == 1
    clock.advance(5 + 1 - FILE_POLL_INTERVAL)  # past the longest deadline: the old credential stops
    key.write_text("test-api-key")
    clock.advance(FILE_POLL_INTERVAL * 3)
    assert old.credential.reloads() == 1
    [new] = ambassador.wiring.current.adapters
    assert new.credential.reloads() == 2 and new is not old
