"""``--workers N``: processes sharing the proxy socket, one admin port for all, clean shutdown."""

import json
import os
import re
import signal
import stat

import pytest_twisted
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer

from ambassador.pipeline.resilience import Policy
from ambassador.app.workers import merge_expositions, share_of
from ambassador.metrics import Metrics
from conftest import SECRETS, get, header, tmdb_env
from processes import spawn_ambassador
from test_cache import page


def test_each_process_gets_its_share_of_the_pods_limits():
    policy = Policy(rate_limit=40, rate_burst=45, max_in_flight=100)
    share = share_of(policy, 3)
    assert (share.rate_limit, share.rate_burst, share.max_in_flight) == (40 / 3, 15, 34)
    unlimited = share_of(Policy(rate_limit=None, max_in_flight=1), 2)
    assert (unlimited.rate_limit, unlimited.max_in_flight) == (None, 1)
    assert share_of(policy, 1) is policy


def test_expositions_merge_with_a_worker_label():
    one = (b'# HELP ambassador_requests_total Inbound.\n# TYPE ambassador_requests_total counter\n'
           b'ambassador_requests_total{adapter="tmdb",code_class="2xx"} 3.0\n'
           b'# HELP ambassador_circuit_state State.\n# TYPE ambassador_circuit_state gauge\n'
           b'ambassador_circuit_state{adapter="tmdb",state="open"} 0.0\n')
    two = one.replace(b"} 3.0", b"} 4.0").replace(b"} 0.0", b"} 1.0")
    merged = merge_expositions([(0, one), (1, two), (2, b"")]).decode()  # worker 2 could not be asked
    assert merged.count("# TYPE ambassador_requests_total counter") == 1
    assert 'ambassador_requests_total{adapter="tmdb",code_class="2xx",worker="0"} 3.0' in merged
    assert 'ambassador_requests_total{adapter="tmdb",code_class="2xx",worker="1"} 4.0' in merged
    assert 'ambassador_circuit_state{adapter="tmdb",state="open",worker="1"} 1.0' in merged
    assert 'worker="2"' not in merged


def test_openmetrics_expositions_merge_as_openmetrics_each_process_its_own_process_and_build_series():
    accept = "application/openmetrics-text"
    one, two = (Metrics().exposition_for(accept)[0] for _ in range(2))
    merged = merge_expositions([(0, one), (1, two)], accept).decode()
    families = {f.name: f for f in openmetrics_families(merged)}  # the strict parser: valid OpenMetrics
    build = families["ambassador_build"]
    assert build.type == "info" and sorted(s.labels["worker"] for s in build.samples) == ["0", "1"]
    started = families["process_start_time_seconds"]
    assert sorted(s.labels["worker"] for s in started.samples) == ["0", "1"]  # one each, not summed
    assert merged.endswith("# EOF\n") and merged.count("# EOF") == 1


class Watched:
    """Waits for text in a TwistdProcess's output (which includes its workers')."""

    def __init__(self, process) -> None:
        self.process = process
        self._waiting: list = []
        received = process.outReceived

        def out_received(data: bytes) -> None:
            received(data)
            for entry in list(self._waiting):
                pattern, count, waiting = entry
                if len(re.findall(pattern, process.output)) >= count:
                    self._waiting.remove(entry)
                    waiting.callback(None)

        process.outReceived = process.errReceived = out_received

    def until(self, pattern: bytes, count: int = 1) -> defer.Deferred:
        waiting = defer.Deferred()
        if len(re.findall(pattern, self.process.output)) >= count:
            waiting.callback(None)
        else:
            self._waiting.append((pattern, count, waiting))
        return waiting


def start_with_workers(fake_tmdb, tmp_path, *args):
    process = spawn_ambassador("--port", "0", "--admin-port", "tcp:0:interface=127.0.0.1", "--workers", "2",
                               "--log-format", "json", "--adapter", "tmdb", *args,
                               env=tmdb_env(fake_tmdb, TMDB_API_KEY="test-api-key"), cwd=tmp_path)
    return process, Watched(process)


async def both_serving(process, watched) -> tuple[str, str]:
    """The proxy and admin URLs, once the primary and worker 1 are both serving."""
    url = f"http://127.0.0.1:{await process.listening}"
    admin = f"http://127.0.0.1:{await process.admin_listening}"
    await watched.until(rb"ambassador worker 1 admin listening")
    return url, admin


def running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie no one has reaped yet does not)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in status)
    except FileNotFoundError:
        return False


def worker_pid(output: bytes, count: int = 1) -> int:
    return int(re.findall(rb'"Worker 1 started \(pid (\d+)\)"', output)[count - 1])


@pytest_twisted.ensureDeferred
async def test_workers_serve_one_port_and_the_primary_reports_for_all(fake_tmdb, tmp_path):
    process, watched = start_with_workers(fake_tmdb, tmp_path)
    try:
        url, admin = await both_serving(process, watched)
        for _ in range(20):  # new connections: the kernel hands them to either process
            response, body = await get(url + "/movies")
            assert response.code == 200 and b"Fight Club" in body
        response, body = await get(admin + "/readyz")
        assert response.code == 200, body
        assert json.loads(body)["workers"] == {"count": 2, "not_running": []}
        response, body = await get(admin + "/metrics")
        text = body.decode()
        served = re.findall(r'ambassador_requests_total\{adapter="tmdb",code_class="2xx",route="movies",'
                            r'worker="(\d)"\} (\S+)', text)
        assert sorted(worker for worker, _ in served) == ["0", "1"]
        assert sum(float(count) for _, count in served) == 20
        started = re.findall(r'process_start_time_seconds\{worker="(\d)"\} ', text)
        built = re.findall(r'ambassador_build_info\{version="[^"]+",worker="(\d)"\} 1.0', text)
        assert sorted(started) == sorted(built) == ["0", "1"]  # each process's own, never summed
        response, body = await get(admin + "/metrics", headers={"Accept": "application/openmetrics-text"})
        assert header(response, "content-type").startswith("application/openmetrics-text")
        served = [s for f in openmetrics_families(body.decode()) if f.name == "ambassador_requests"
                  for s in f.samples if s.name == "ambassador_requests_total" and s.labels["route"] == "movies"
                  and s.labels["code_class"] == "2xx"]
        assert sorted(s.labels["worker"] for s in served) == ["0", "1"] and sum(s.value for s in served) == 20
    finally:
        process.transport.signalProcess(signal.SIGTERM)
    output = process.output.decode()
    assert await process.ended == (0, None), output
    assert not running(worker_pid(process.output))
    events = [json.loads(line) for line in output.splitlines()]  # whole lines, never mixed
    assert {e["worker"] for e in events if e["logger"] == "ambassador.access"} <= {0, 1}
    for secret in SECRETS:
        assert secret not in output


async def by_worker(admin: str, name: str, **labels: str) -> dict[str, float]:
    """The value of sample ``name`` with ``labels`` in each process, by its worker label."""
    _, body = await get(admin + "/metrics")
    return {sample.labels["worker"]: sample.value for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())}


@pytest_twisted.ensureDeferred
async def test_simultaneous_cold_requests_make_one_upstream_request_from_all_workers(fake_tmdb, tmp_path):
    process, watched = start_with_workers(fake_tmdb, tmp_path)
    try:
        url, admin = await both_serving(process, watched)
        [directory] = set(re.findall(rb'peers listening on (/[^"]+)/worker-[01]\.sock', process.output))
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        fake_tmdb.fault = "hang"
        calls = [defer.ensureDeferred(get(url + "/movies")) for _ in range(40)]
        for _ in range(10_000):  # until every caller is in one process or the other, waiting
            waiting = await by_worker(admin, "ambassador_requests_in_flight", adapter="tmdb")
            if sum(waiting.values()) == 40:
                break
        else:
            raise AssertionError(f"not every caller is waiting: {waiting}")
        assert len(fake_tmdb.requests) == 1
        fake_tmdb.fault, fake_tmdb.canned = None, page(Cache_Control="max-age=60")
        fake_tmdb.release()
        answers = [await call for call in calls]
        assert {response.code for response, _ in answers} == {200} and len({body for _, body in answers}) == 1
        hits = set()
        for _ in range(200):  # new connections, to either process: each answers from its own memory
            response, _ = await get(url + "/movies")
            assert response.headers.getRawHeaders("cache-status")[0].startswith("ambassador; hit")
            hits = {e["worker"] for e in map(json.loads, process.output.splitlines())
                    if e.get("logger") == "ambassador.access" and e.get("cache") == "hit"}
            if hits == {0, 1}:
                break
        assert hits == {0, 1}
        assert len(fake_tmdb.requests) == 1
        asked = sum((await by_worker(admin, "ambassador_peer_asks_total", outcome="relayed")).values())
        assert asked == 1  # once, by the process not owning the key: its later hits are its own
        assert not any((await by_worker(admin, "ambassador_peer_asks_total", outcome="fallback")).values())
    finally:
        process.transport.signalProcess(signal.SIGTERM)
    assert await process.ended == (0, None), process.output.decode()
    assert not os.path.exists(directory)


@pytest_twisted.ensureDeferred
async def test_a_worker_that_dies_is_started_again(fake_tmdb, tmp_path):
    process, watched = start_with_workers(fake_tmdb, tmp_path)
    try:
        url, admin = await both_serving(process, watched)
        os.kill(worker_pid(process.output), signal.SIGKILL)
        await watched.until(rb"Worker 1 ended")
        response, body = await get(admin + "/readyz")  # restarted a second later
        assert (response.code, json.loads(body)["workers"]["not_running"]) == (503, [1])
        await watched.until(rb"ambassador worker 1 admin listening", count=2)
        assert worker_pid(process.output, 2) != worker_pid(process.output, 1)
        assert (await get(url + "/movies"))[0].code == 200
    finally:
        process.transport.signalProcess(signal.SIGTERM)
    assert await process.ended == (0, None), process.output.decode()


@pytest_twisted.ensureDeferred
async def test_workers_stop_when_the_primary_is_gone(fake_tmdb, tmp_path):
    process, watched = start_with_workers(fake_tmdb, tmp_path)
    await process.listening
    await watched.until(rb"ambassador worker 1 admin listening")
    process.transport.signalProcess(signal.SIGKILL)
    await process.ended  # only once every process holding its output has ended: the worker too
    assert b"The primary process ended; stopping" in process.output
    assert b'"message": "Server Shut Down.", "worker": 1}' in process.output  # it stopped cleanly
    [directory] = set(re.findall(rb'peers listening on (/[^"]+)/worker-[01]\.sock', process.output))
    assert not os.path.exists(directory)  # removed by the worker, the last process out


@pytest_twisted.ensureDeferred
async def test_a_shared_port_accepts_one_connection_each_time_it_is_ready():
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    from ambassador.app.workers import accept_one_at_a_time

    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    try:
        accept_one_at_a_time(port)
        port.numberAccepts = 120  # what Twisted does after a burst
        assert port.numberAccepts == 1
        assert port.getHost().port > 0  # still the same port
    finally:
        await port.stopListening()
