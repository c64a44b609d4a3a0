"""What a forward proxy costs a request: sequential requests through the ambassador to a TLS upstream on
loopback (no cache, so each goes upstream), direct and through a real tinyproxy (a CONNECT tunnel, kept and
reused like a direct connection). Run from the repository root: .venv/bin/python bench/egress.py
(needs tinyproxy). Not part of bench/run; docs/egress.md records a run."""

import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import treq
from twisted.internet import ssl, task
from twisted.internet.defer import ensureDeferred
from twisted.web.client import HTTPConnectionPool

from ambassador.app.configfile import adapters_from_file
from ambassador.pipeline.proxies import ProxyEnvironment
from ambassador.testing import FakeAPI, QuietSite, start_ambassador

sys.path.insert(0, "tests")
from certificates import ThrowawayCA  # noqa: E402  (the tests' throwaway CA)

REQUESTS = 500


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def main(reactor) -> None:
    directory = Path(tempfile.mkdtemp())
    ca = ThrowawayCA()
    server = ssl.PrivateCertificate.loadPEM(ca.issue("localhost").pem)
    upstream = reactor.listenSSL(0, QuietSite(FakeAPI(accept=lambda request: True)), server.options(),
                                 interface="127.0.0.1").getHost().port
    (directory / "ca.pem").write_bytes(ca.pem)
    proxy_port = free_port()
    (directory / "tinyproxy.conf").write_text(f"Port {proxy_port}\nListen 127.0.0.1\nTimeout 30\nAllow 127.0.0.1\n"
                                              f"ConnectPort {upstream}\nLogLevel Critical\n")
    tinyproxy = subprocess.Popen(["tinyproxy", "-d", "-c", str(directory / "tinyproxy.conf")])
    time.sleep(0.5)  # tinyproxy binds its port
    (directory / "ambassador.yaml").write_text(
        f"adapters:\n  f:\n    mount: /f\n    base_url: https://localhost:{upstream}\n"
        f"    ca_file: {directory}/ca.pem\n    credential: {{style: bearer, secret: {{env: TOKEN}}}}\n")
    pool = HTTPConnectionPool(reactor)
    pool.maxPersistentPerHost = 1
    ways = (("direct", ProxyEnvironment()),
            ("tinyproxy", ProxyEnvironment.from_environ({"HTTPS_PROXY": f"127.0.0.1:{proxy_port}"})))
    try:
        for label, proxies in ways:
            adapters = adapters_from_file(str(directory / "ambassador.yaml"), {"TOKEN": "x"}, [], reactor)
            ambassador = start_ambassador(adapters, proxies=proxies, cache_bytes=None, grace_period=0)
            for n in range(20 + REQUESTS):  # 20 to warm up
                if n == 20:
                    started = time.perf_counter()
                response = await treq.get(ambassador.url + "/f/a", pool=pool)
                await response.content()
                assert response.code == 200, response.code
            took = time.perf_counter() - started
            print(f"{label}: {REQUESTS} sequential requests in {took:.2f} s, {took / REQUESTS * 1000:.2f} ms each")
            await ambassador.service.stopService()
    finally:
        tinyproxy.terminate()
        tinyproxy.wait()


task.react(lambda reactor: ensureDeferred(main(reactor)))
