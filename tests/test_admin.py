"""The admin listener over real HTTP: liveness, readiness in each state, metrics after known requests."""

import json
import shutil

import pytest
import pytest_twisted
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.utils import getProcessOutputAndValue
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent

from ambassador import __version__ as ambassador_version
from ambassador.credentials.sources import FILE_POLL_INTERVAL
from ambassador.metrics import PROBLEM_KINDS
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


# Per-adapter counters and the label sets each has for a served adapter before any request.
AT_ZERO = {
    "ambassador_requests_total": [{"route": r, "code_class": c} for r in ("movies", "tmdb-v3")
                                  for c in ("1xx", "2xx", "3xx", "4xx", "5xx")],
    "ambassador_upstream_attempts_total": [{"outcome": o} for o in ("1xx", "2xx", "3xx", "4xx", "5xx", "timeout",
                                                                     "cancelled", "too-large", "unreachable")],
    "ambassador_cache_answers_total": [{"outcome": o} for o in ("hit", "miss", "refreshed", "revalidated",
                                                                 "stale-while-revalidate", "stale-if-error",
                                                                 "collapsed", "bypass")],
    "ambassador_problems_total": [{"kind": k} for k in PROBLEM_KINDS],
    "ambassador_upstream_retries_total": [{}], "ambassador_rate_limit_waits_total": [{}],
    "ambassador_rate_limit_rejections_total": [{}], "ambassador_concurrency_rejections_total": [{}],
}


@pytest_twisted.ensureDeferred
async def test_every_per_adapter_counter_is_there_at_0_before_the_first_request(fake_tmdb, start_ambassador):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, **KEY))
    values = samples((await get(ambassador.admin_url + "/metrics"))[1])
    for name, label_sets in AT_ZERO.items():
        for labels in label_sets:
            assert values[(name, frozenset({"adapter": "tmdb", **labels}.items()))] == 0, (name, labels)
    assert values[("ambassador_circuit_state", frozenset({"adapter": "tmdb", "state": "closed"}.items()))] == 1
    assert values[("ambassador_reloads_total", frozenset({"outcome": "error"}.items()))] == 0
    assert fake_tmdb.requests == []


@pytest_twisted.ensureDeferred
async def test_metrics_follow_the_conventions_process_build_info_and_openmetrics_when_asked(fake_tmdb,
                                                                                            start_ambassador):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, **KEY))
    response, text = await get(ambassador.admin_url + "/metrics")
    assert header(response, "content-type") == "text/plain; version=0.0.4; charset=utf-8"
    values = samples(text)
    assert values[("ambassador_build_info", frozenset({"version": ambassador_version}.items()))] == 1
    assert values[("process_start_time_seconds", frozenset())] > 0
    assert values[("process_resident_memory_bytes", frozenset())] > 0
    assert ("process_cpu_seconds_total", frozenset()) in values
    assert any(name == "python_info" for name, _ in values)
    response, body = await get(ambassador.admin_url + "/metrics",
                               headers={"Accept": "application/openmetrics-text; version=1.0.0,text/plain;q=0.5"})
    assert header(response, "content-type").startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")
    families = {f.name: f for f in openmetrics_families(body.decode())}  # the strict parser: valid OpenMetrics
    assert families["ambassador_build"].type == "info"
    assert [s.labels for s in families["ambassador_build"].samples] == [{"version": ambassador_version}]
    assert families["ambassador_requests"].type == "counter"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (Debian package prometheus; "
                    "./run-tests installs it when it runs as root)")
@pytest_twisted.ensureDeferred
async def test_promtool_finds_nothing_to_say_of_the_metrics(fake_tmdb, start_ambassador):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, **KEY))
    await get(ambassador.url + "/movies")
    fake_tmdb.fault = "reset"
    await get(ambassador.url + "/tmdb/3/movie/550")
    _, exposition = await get(ambassador.admin_url + "/metrics")
    out, err, code = await getProcessOutputAndValue(shutil.which("promtool"), ["check", "metrics"],
                                                    env={}, stdinBytes=exposition)
    assert (code, out + err) == (0, b"")


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
    assert value("ambassador_problems_total", adapter="", kind="not-found") == 1
    assert value("ambassador_problems_total", adapter="tmdb", kind="upstream-unreachable") == 1
    assert value("ambassador_problems_total", adapter="tmdb", kind="upstream-timeout") == 0
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
async def test_a_rejected_credential_is_logged_once_per_value_and_again_when_accepted(fake_tmdb, start_ambassador,
                                                                                       tmp_path, log_events):
    clock = Clock()
    key = tmp_path / "key"
    key.write_text("caller-own-key")  # not a key the fake takes
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, TMDB_API_KEY_FILE=str(key)), clock=clock)
    tmdb = ambassador.readiness["tmdb"].adapter

    def credential_events():
        return [e for e in log_events if "the credential" in formatEvent(e)]

    for page in (1, 2, 3):
        assert (await get(ambassador.url + f"/movies?page={page}"))[0].code == 502
    [rejected] = credential_events()
    first = tmdb.credential.fingerprint()
    assert rejected["log_level"] == LogLevel.warn and (rejected["fingerprint"], rejected["status"]) == (first, 401)
    assert formatEvent(rejected) == (f"The tmdb service rejected the credential with fingerprint {first} (status "
                                     "401); its answers are 502 credential-rejected until it takes one")
    key.write_text("rotated-api-key")  # rotated to another value the upstream rejects: logged again
    clock.advance(FILE_POLL_INTERVAL)
    for page in (4, 5):
        assert (await get(ambassador.url + f"/movies?page={page}"))[0].code == 502
    second = tmdb.credential.fingerprint()
    assert second != first and [e["fingerprint"] for e in credential_events()] == [first, second]
    key.write_text("test-api-key")
    clock.advance(FILE_POLL_INTERVAL)
    for page in (6, 7):
        assert (await get(ambassador.url + f"/movies?page={page}"))[0].code == 200
    accepted = credential_events()[2:]
    assert [(e["log_level"], formatEvent(e)) for e in accepted] == [
        (LogLevel.info, f"The tmdb service accepts the credential again (fingerprint {tmdb.credential.fingerprint()})")]


@pytest_twisted.ensureDeferred
async def test_admin_answers_problems_for_unknown_paths_and_methods(fake_tmdb, start_ambassador):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb))
    response, body = await get(ambassador.admin_url + "/movies")
    assert response.code == 404 and header(response, "content-type") == "application/problem+json"
    response, body = await get(ambassador.admin_url + "/readyz", method="POST")
    assert response.code == 405 and json.loads(body)["type"] == "urn:ambassador:problem:method-not-allowed"
    assert fake_tmdb.requests == []
