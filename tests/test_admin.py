"""The admin listener over real HTTP: liveness, readiness in each state, metrics after known requests."""

import json

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock

from ambassador.credentials.sources import FILE_POLL_INTERVAL
from ambassador.pipeline.resilience import Policy
from conftest import SECRETS, get, header, tmdb_env

KEY = {"TMDB_API_KEY": "test-api-key"}


async def readiness(ambassador):
    response, body = await get(ambassador.admin_url + "/readyz")
    return response.code, json.loads(body)


def samples(exposition: bytes) -> dict:
    """{(sample name, frozenset(labels)): value} from the Prometheus text format."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(exposition.decode())
        for s in family.samples
    }


@pytest_twisted.ensureDeferred
async def test_healthz_answers_while_serving(fake_tmdb, start_ambassador):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb))
    response, body = await get(ambassador.admin_url + "/healthz")
    assert (response.code, body) == (200, b"ok\n")


@pytest_twisted.ensureDeferred
async def test_not_ready_without_a_credential(fake_tmdb, start_ambassador):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb))
    code, report = await readiness(ambassador)
    assert code == 503 and report["ready"] is False
    [reason] = report["adapters"]["tmdb"]["reasons"]
    assert reason.startswith("credential missing") and "TMDB_API_KEY" in reason


async def upstreams(ambassador):
    response, body = await get(ambassador.admin_url + "/upstreams")
    assert response.code == 200 and header(response, "content-type") == "application/json"
    return json.loads(body)


@pytest_twisted.ensureDeferred
async def test_a_rejected_credential_is_an_upstream_state_not_unreadiness(fake_tmdb, start_ambassador):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, **KEY))
    assert (await upstreams(ambassador))["adapters"]["tmdb"] == {
        "up": True, "reasons": [], "circuit": "closed", "credential": "present", "probed": True}
    fake_tmdb.api_keys.clear()  # TMDB revoked the key
    assert (await get(ambassador.url + "/movies"))[0].code == 502
    code, report = await readiness(ambassador)
    assert code == 200 and report["adapters"]["tmdb"]["ready"] is True  # the Pod stays in its Service
    tmdb = (await upstreams(ambassador))["adapters"]["tmdb"]
    assert (tmdb["up"], tmdb["reasons"]) == (False, ["credential rejected by the upstream"])
    _, exposition = await get(ambassador.admin_url + "/metrics")
    up = ("ambassador_upstream_up", frozenset({("adapter", "tmdb")}))
    assert samples(exposition)[up] == 0
    assert samples(exposition)[("ambassador_adapter_ready", frozenset({("adapter", "tmdb")}))] == 1
    fake_tmdb.api_keys.add("test-api-key")
    assert (await get(ambassador.url + "/movies"))[0].code == 200
    assert (await upstreams(ambassador))["adapters"]["tmdb"]["up"] is True
    assert samples((await get(ambassador.admin_url + "/metrics"))[1])[up] == 1


@pytest_twisted.ensureDeferred
async def test_vanished_secret_file_is_a_warning_not_unreadiness(fake_tmdb, start_ambassador, tmp_path):
    clock = Clock()
    (tmp_path / "key").write_text("test-api-key")
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, TMDB_API_KEY_FILE=str(tmp_path / "key")), clock=clock)
    (tmp_path / "key").unlink()
    clock.advance(FILE_POLL_INTERVAL)
    code, report = await readiness(ambassador)
    assert code == 200
    [warning] = report["adapters"]["tmdb"]["warnings"]
    assert str(tmp_path / "key") in warning and "last good value" in warning


@pytest_twisted.ensureDeferred
async def test_probe_finds_a_bad_credential_before_any_caller_does(fake_tmdb, start_ambassador):
    clock = Clock()
    fake_tmdb.api_keys.clear()
    probed = fake_tmdb.next_request()
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, **KEY), clock=clock, probe_interval=30)
    await probed
    assert (await readiness(ambassador))[0] == 200
    tmdb = (await upstreams(ambassador))["adapters"]["tmdb"]
    assert tmdb["reasons"] == ["probe failed: /3/configuration answered status 401"] and tmdb["up"] is False
    fake_tmdb.api_keys.add("test-api-key")
    probed = fake_tmdb.next_request()
    clock.advance(29)
    assert not probed.called
    clock.advance(1)
    await probed
    assert [r.path for r in fake_tmdb.requests] == ["/3/configuration", "/3/configuration"]
    assert (await upstreams(ambassador))["adapters"]["tmdb"]["up"] is True


@pytest_twisted.ensureDeferred
async def test_a_base_url_with_a_path_prefix_is_kept_by_requests_and_probes(fake_tmdb, start_ambassador):
    # TMDB_BASE_URL=https://egress.example.com/tmdb: an egress gateway serving the API below a path.
    fake_tmdb.base_path = "/egress/tmdb"
    probed = fake_tmdb.next_request()
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, TMDB_BASE_URL=fake_tmdb.base_url + "/egress/tmdb/", **KEY),
                                        clock=Clock(), probe_interval=30)
    await probed
    response, _ = await get(ambassador.url + "/movies")
    assert response.code == 200
    response, _ = await get(ambassador.url + "/tmdb/3/movie/550")
    assert response.code == 200
    assert [r.path for r in fake_tmdb.requests] == [
        "/egress/tmdb/3/configuration", "/egress/tmdb/3/discover/movie", "/egress/tmdb/3/movie/550"]
    assert (await upstreams(ambassador))["adapters"]["tmdb"]["up"] is True


@pytest_twisted.ensureDeferred
async def test_metrics_after_a_known_sequence(fake_tmdb, start_ambassador):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, **KEY), policies={"tmdb": Policy(retries=0)})
    url = ambassador.url
    await get(url + "/movies?api_key=caller-own-key")
    await get(url + "/movies")
    await get(url + "/tmdb/3/movie/1")
    await get(url + "/nowhere")
    fake_tmdb.fault = "reset"
    await get(url + "/tmdb/3/movie/550")
    response, exposition = await get(ambassador.admin_url + "/metrics")
    assert response.code == 200 and header(response, "content-type").startswith("text/plain")
    values = samples(exposition)

    def value(name, **labels):
        return values.get((name, frozenset(labels.items())), 0)

    assert value("ambassador_requests_total", adapter="tmdb", route="movies", code_class="2xx") == 2
    assert value("ambassador_requests_total", adapter="tmdb", route="tmdb-v3", code_class="4xx") == 1
    assert value("ambassador_requests_total", adapter="tmdb", route="tmdb-v3", code_class="5xx") == 1
    assert value("ambassador_requests_total", adapter="", route="unmatched", code_class="4xx") == 1
    assert value("ambassador_request_duration_seconds_count", adapter="tmdb", route="movies") == 2
    # The caller's own key is dropped, so the second /movies is the first one's cache hit.
    assert value("ambassador_upstream_attempts_total", adapter="tmdb", outcome="2xx") == 1
    assert value("ambassador_upstream_attempts_total", adapter="tmdb", outcome="4xx") == 1
    assert value("ambassador_upstream_attempts_total", adapter="tmdb", outcome="unreachable") == 1
    assert value("ambassador_upstream_retries_total", adapter="tmdb") == 0
    assert value("ambassador_upstream_duration_seconds_count", adapter="tmdb") == 3
    assert value("ambassador_cache_answers_total", adapter="tmdb", outcome="miss") == 2
    assert value("ambassador_cache_answers_total", adapter="tmdb", outcome="hit") == 1
    assert value("ambassador_cache_entries") == 1  # TMDB's 404 says nothing about caching
    assert 1000 < value("ambassador_cache_bytes") < 2000 and value("ambassador_cache_max_bytes") == 64 * 2**20
    assert value("ambassador_requests_in_flight", adapter="tmdb") == 0
    assert value("ambassador_credential_present", adapter="tmdb") == 1
    assert value("ambassador_adapter_ready", adapter="tmdb") == 1
    label_values = {v for (_, labels) in values for _, v in labels}
    assert not any("/" in v or "?" in v for v in label_values)
    for secret in SECRETS:
        assert secret.encode() not in exposition


@pytest_twisted.ensureDeferred
async def test_credential_reloads_are_counted(fake_tmdb, start_ambassador, tmp_path):
    clock = Clock()
    fake_tmdb.api_keys.add("rotated-api-key")
    (tmp_path / "key").write_text("test-api-key")
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, TMDB_API_KEY_FILE=str(tmp_path / "key")), clock=clock)
    (tmp_path / "key").write_text("rotated-api-key")
    clock.advance(FILE_POLL_INTERVAL)
    _, exposition = await get(ambassador.admin_url + "/metrics")
    assert samples(exposition)[("ambassador_credential_reloads_total", frozenset({("adapter", "tmdb")}))] == 1
    await get(ambassador.url + "/movies")
    assert fake_tmdb.requests[-1].param("api_key") == "rotated-api-key"


@pytest_twisted.ensureDeferred
async def test_admin_answers_problems_for_unknown_paths_and_methods(fake_tmdb, start_ambassador):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb))
    response, body = await get(ambassador.admin_url + "/movies")
    assert response.code == 404 and header(response, "content-type") == "application/problem+json"
    response, body = await get(ambassador.admin_url + "/readyz", method="POST")
    assert response.code == 405 and json.loads(body)["type"] == "urn:ambassador:problem:method-not-allowed"
    assert fake_tmdb.requests == []
