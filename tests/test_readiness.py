"""Readiness is the ambassador's own: listeners, configuration, credentials of the adapters it was
asked to serve. The outside world's state is /upstreams; a lost listener fails /healthz."""

import json
import signal

import pytest
import pytest_twisted
from twisted.internet import reactor

from ambassador.app.reload import load_adapters
from ambassador.app.settings import AdapterSpec
from ambassador.interfaces import ConfigurationError
from conftest import get, tmdb_env
from processes import spawn_ambassador


def spec(**environ):
    return AdapterSpec(environ={"TMDB_BASE_URL": "http://127.0.0.1:1", **environ})


def test_an_adapter_nobody_configured_is_listed_as_such(tmp_path):
    assert "tmdb" in load_adapters(spec(), reactor).unconfigured  # discovered, no credential variable
    assert "tmdb" not in load_adapters(spec(TMDB_API_KEY="k"), reactor).unconfigured
    # A credential file that is not there yet is a source: the adapter is configured, and waits for it.
    absent = str(tmp_path / "absent")
    assert "tmdb" not in load_adapters(spec(TMDB_API_KEY_FILE=absent), reactor).unconfigured
    named = AdapterSpec(names=["tmdb"], environ={})
    assert load_adapters(named, reactor).unconfigured == frozenset()  # named explicitly: it must have one
    with pytest.raises(ConfigurationError, match="--forward-request-id must name an adapter"):
        load_adapters(AdapterSpec(names=["tmdb"], forward_request_id={"omdb"}, environ={}), reactor)


async def admin(process, path):
    if not hasattr(process, "admin_port"):  # a Deferred gives its result to one await
        process.admin_port = await process.admin_listening
    response, body = await get(f"http://127.0.0.1:{process.admin_port}{path}")
    return response.code, json.loads(body)


@pytest_twisted.ensureDeferred
async def test_an_unconfigured_adapter_does_not_block_readiness_a_named_one_does(fake_tmdb, tmp_path):
    args = ("--port", "0", "--admin-port", "tcp:0:interface=127.0.0.1")
    plain = spawn_ambassador(*args, env=tmdb_env(fake_tmdb), cwd=tmp_path, twistd_options=["--pidfile="])
    named = spawn_ambassador(*args, "--adapter", "tmdb", env=tmdb_env(fake_tmdb), cwd=tmp_path,
                             twistd_options=["--pidfile="])
    try:
        code, report = await admin(plain, "/readyz")
        assert code == 200 and report["ready"] is True
        tmdb = report["adapters"]["tmdb"]
        assert tmdb["configured"] is False and tmdb["detail"].startswith("not configured: no credential for tmdb")
        code, upstreams = await admin(plain, "/upstreams")
        assert code == 200 and upstreams["adapters"]["tmdb"]["credential"] == "not configured"
        code, report = await admin(named, "/readyz")
        assert code == 503 and report["ready"] is False
        [reason] = report["adapters"]["tmdb"]["reasons"]
        assert reason.startswith("credential missing") and "TMDB_API_KEY" in reason
    finally:
        for process in (plain, named):
            process.transport.signalProcess(signal.SIGTERM)
    assert await plain.ended == (0, None) and await named.ended == (0, None)


@pytest_twisted.ensureDeferred
async def test_a_lost_listener_fails_liveness_and_readiness(fake_tmdb, start_ambassador):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, TMDB_API_KEY="test-api-key"))
    response, body = await get(ambassador.admin_url + "/healthz")
    assert (response.code, body) == (200, b"ok\n")
    assert ambassador.proxy.port is not None
    await ambassador.proxy.port.stopListening()  # what a lost socket looks like from inside
    response, body = await get(ambassador.admin_url + "/healthz")
    assert (response.code, body) == (503, b"not listening: proxy\n")
    response, body = await get(ambassador.admin_url + "/readyz")
    assert response.code == 503 and json.loads(body)["listeners_lost"] == ["proxy"]
