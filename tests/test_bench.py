"""bench/run works end to end: with tiny durations, every scenario (S1–S8) gets its row, with numbers.

Only that: speed is measured by bench/run, never asserted in a test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ECHO_MODULE = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")

# scenario, target, then req/s, p50 and p99 in the table's columns.
MEASURED = re.compile(r"^(S[1-3]) .+?\s{2,}(upstream|nginx|ambassador)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)(\s|$)")


@pytest.mark.skipif(os.geteuid() != 0 and not (shutil.which("wrk") and shutil.which("nginx") and ECHO_MODULE.exists()),
                    reason="bench/run needs wrk, nginx and libnginx-mod-http-echo, or root to install them")
def test_bench_prints_every_scenario(tmp_path):
    out = tmp_path / "last-run.txt"
    # The venv running this test holds the ambassador just installed (./run-tests): bench/run uses it.
    run = subprocess.run([sys.executable, str(REPO / "bench" / "run"), "--tiny", "--venv", sys.prefix,
                          "--out", str(out)],
                         capture_output=True, text=True, timeout=600)  # the first run on a clean machine installs
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = out.read_text()
    assert table in run.stdout

    measured = {(m[1], m[2]) for m in map(MEASURED.match, table.splitlines()) if m}
    assert measured == {("S1", "upstream"), ("S1", "nginx"), ("S1", "ambassador"),
                        ("S2", "upstream"), ("S2", "nginx"), ("S2", "ambassador"), ("S3", "nginx"),
                        ("S3", "ambassador")}, table
    for scenario in ("S1 proxy path", "S2 slow upstream"):  # recorded figures, no verdict
        assert re.search(rf"^{scenario} +ambassador .* recorded", table, re.M), table
    assert re.search(r"^S1 proxy path +go seed .*blocked", table, re.M), table
    for scenario in ("S3 cache path", "S7 mix, flat out"):  # the twisted.web floor, beside the peers
        assert re.search(rf"^{scenario} +twisted.web leaf +\d+ +[\d.]+ +[\d.]+ .*the floor", table, re.M), table
    assert re.search(r"^S3 cache path +ambassador .*needs ≥[\d.]+× nginx's hits per process", table, re.M), table
    assert re.search(r"^S4 .*upstream requests: \d+ .*\d+/20 answered 200", table, re.M), table
    assert re.search(r"^S5 .*one idle process [\d.]+ MiB \(needs ≤\d+\), S2's ambassador: start [\d.]+ MiB, "
                     r"peak [\d.]+, idle after S2 [\d.]+", table, re.M), table
    assert re.search(r"^S6 added latency +upstream +\d+ +[\d.]+ +[\d.]+ ", table, re.M), table
    for kind in ("miss", "hit"):
        assert re.search(rf"^S6 added latency, {kind} +ambassador .*added p50 -?[\d.]+ ms .*p99 -?[\d.]+ ms", table,
                         re.M), table
    for mode in ("flat out", "paced"):
        for target in ("nginx", "ambassador"):
            assert re.search(rf"^S7 mix, {mode} +{target} +\d+ +[\d.]+ +[\d.]+ .*statuses .*200 share [\d.]+; "
                             r"upstream: \d+ requests, peak \d+/s, \d+ × 429", table, re.M), table
        assert re.search(rf"^S7 mix, {mode} +go seed .*blocked", table, re.M), table
    for cache in ("memory", "Redis"):
        assert re.search(rf"^S6 added latency, {cache} miss +ambassador .*added p50 -?[\d.]+ ms", table, re.M), table
    assert re.search(r"^S6 added latency, Redis miss .*Redis over memory: [+-]+[\d.]+ ms p50, [+-]+\d+ µs CPU",
                     table, re.M), table
    assert re.search(r"^S8 replicas, flat out +ambassador .*upstream: \d+ requests \(needs ≤\d+\), peak \d+/s, "
                     r"\d+ × 429", table, re.M), table
    assert re.search(r"^S8 replicas, cold burst +ambassador .*upstream requests: \d+ .*\d+/20 answered 200", table,
                     re.M), table
    verdicts = [line for line in table.splitlines() if re.match(r"S[3-8] .*ambassador", line)
                and not re.match(r"S6 added latency, (memory|Redis) miss", line)]
    assert len(verdicts) == 9 and all(re.search(r"\b(PASS|MISS)\b", line) for line in verdicts), table
    workdir = re.search(r"^bench: working in (\S+)$", run.stdout, re.M)[1]
    assert not Path(workdir).exists()
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and in_directory(pid, workdir)], \
        "bench/run left processes behind"


def in_directory(pid: str, directory: str) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/cwd").startswith(directory)
    except OSError:
        return False


def test_gzip_bench_prints_both_answers():
    run = subprocess.run([sys.executable, str(REPO / "bench" / "gzip_tmdb.py"), "--fetches", "5"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for answer in ("movie-detail", "discover-page"):
        sizes = re.search(rf"^{answer}\s+(\d+)\s+\d+\s+(\d+)\s", run.stdout, re.M)
        assert sizes and int(sizes[2]) < int(sizes[1]), run.stdout  # gzip-6 below identity: it compressed
        assert re.search(rf"^{answer}\s+[\d.]+\s+[\d.]+\s+[+-][\d.]+$", run.stdout, re.M), run.stdout
