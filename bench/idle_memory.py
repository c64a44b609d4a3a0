"""Where an idle ambassador's memory goes. Run from the repository root: .venv/bin/python bench/idle_memory.py

First the process itself: ``twistd -n --pidfile= ambassador --port 0 --admin-port 0`` with a dummy TMDB key
(the defaults otherwise: cache on, no Redis, no tracing, no config file), VmRSS read as bench/run's
``settled_rss`` reads it (every 0.5 s until it moves less than 0.5 MiB), best of three, with its anonymous
and file-backed shares and its threads. Then what each library adds at rest: a fresh interpreter imports
them in the order the process does and prints VmRSS after each (a library shared with an earlier line is
counted there). Not part of bench/run; docs/performance.md ("Memory of an idle process") records a run."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TWISTD = Path(sys.executable).with_name("twistd")

# (what, the modules imported for it), in the order an idle process first imports them.
LAYERS = [
    ("typing, zope.interface, twisted", ["typing", "zope.interface", "twisted"]),
    ("ssl, hashlib: the system's libssl and libcrypto", ["ssl", "hashlib"]),
    ("http.cookiejar: urllib.request, http.client, email", ["http.cookiejar"]),
    ("twisted.python.log: compat, failure, logger", ["twisted.python.log"]),
    ("asyncio (twisted.internet.defer imports it)", ["asyncio"]),
    ("twisted.internet.defer", ["twisted.internet.defer"]),
    ("cryptography's Rust bindings (their own OpenSSL)", ["cryptography.hazmat.bindings._rust"]),
    ("cryptography.x509, pyOpenSSL", ["cryptography.x509", "OpenSSL"]),
    ("the reactor: tcp, posixbase, epoll", ["twisted.internet.epollreactor"]),
    ("twistd: application, plugin, usage", ["twisted.scripts.twistd", "twisted.scripts._twistd_unix"]),
    ("twistd's plugin cache: twisted.trial.itrial, unittest", ["twisted.trial.itrial"]),
    ("twisted.internet.endpoints, ssl, service_identity", ["twisted.internet.endpoints", "twisted.internet.ssl"]),
    ("twisted.web.server: http, spread.pb, templates", ["twisted.web.server"]),
    ("twisted.web.client, treq: hyperlink, multipart", ["twisted.web.client", "treq"]),
    ("prometheus_client", ["prometheus_client"]),
    ("the ambassador's own modules", ["ambassador.app.service", "twisted.plugins.ambassador_service",
                                      "twisted.plugins.ambassador_tmdb"]),
]

_LAYERED = """
import sys
def rss():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) / 1024
start = ["python (interpreter, site)", rss(), len(sys.modules)]
import importlib, json
print(json.dumps(start))
for what, modules in json.loads(sys.argv[1]):
    for name in modules:
        importlib.import_module(name)
    if name == "twisted.internet.epollreactor":
        sys.modules[name].install()
    print(json.dumps([what, rss(), len(sys.modules)]))
"""


def status(pid: int, field: str) -> int:
    """A number from /proc/PID/status (VmRSS in KiB, Threads)."""
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])


def idle_process() -> tuple[float, float, float, int]:
    """VmRSS once settled, its anonymous and file-backed MiB, and the threads, of one idle ambassador."""
    env = {"PATH": os.environ.get("PATH", ""), "TMDB_API_KEY": "dummy"}
    with tempfile.TemporaryDirectory() as cwd:
        process = subprocess.Popen([str(TWISTD), "-n", "--pidfile=", "ambassador", "--port", "0", "--admin-port", "0"],
                                   env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline, last = time.monotonic() + 30, -1.0
            while time.monotonic() < deadline:
                time.sleep(0.5)
                now = status(process.pid, "VmRSS") / 1024
                if abs(now - last) < 0.5:
                    break
                last = now
            rollup = dict(line.split()[:2] for line in Path(f"/proc/{process.pid}/smaps_rollup").read_text().splitlines()[1:])
            anonymous = int(rollup["Anonymous:"]) / 1024
            return now, anonymous, now - anonymous, status(process.pid, "Threads")
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait()


def main() -> None:
    runs = [idle_process() for _ in range(3)]
    rss, anonymous, files, threads = min(runs)
    print(f"idle ambassador: VmRSS {rss:.1f} MiB (runs: {', '.join(f'{r[0]:.1f}' for r in runs)}), "
          f"{anonymous:.1f} anonymous, {files:.1f} file-backed, {threads} thread(s)\n")
    with tempfile.TemporaryDirectory() as cwd:  # -I and cwd: the installed ambassador, not this work tree's
        out = subprocess.run([sys.executable, "-I", "-c", _LAYERED, json.dumps(LAYERS)], capture_output=True,
                             text=True, check=True, cwd=cwd).stdout
    print("| what | adds MiB | VmRSS MiB | modules |\n|---|---|---|---|")
    before = 0.0
    for line in out.splitlines():
        what, now, modules = json.loads(line)
        print(f"| {what} | {now - before:+.1f} | {now:.1f} | {modules} |")
        before = now


if __name__ == "__main__":
    main()
