"""A whole day in one real ``twistd ambassador --config`` process: every style, every error path, a
Secret rotation and OAuth2; then every byte it wrote (responses, logs, metrics, --help, its command
line) is searched for every secret it was given."""

import os
import signal

import pytest_twisted
import treq
from twisted.internet import reactor

from ambassador.testing import FakeAPI, FakeOAuth2TokenEndpoint, FakeTMDB, serve
from conftest import SECRETS
from processes import run_twistd, spawn_ambassador
from test_credentials import kubelet_secret_volume

ENVIRON = {"QUERY_KEY": "query-secret", "HEADER_KEY": "header-secret", "BASIC_PASSWORD": "basic-password",
           "CLIENT_SECRET": "test-client-secret", "TMDB_API_KEY": "test-api-key"}


def bearer(*tokens):
    return lambda request: request.headers.get("authorization") in {f"Bearer {t}" for t in tokens}


def config(apis, token_urls, closed, secret_dir) -> str:
    return f"""
adapters:
  q:
    mount: /q
    base_url: {apis['q']}/v1
    paths: [/items]
    credential: {{style: query, param: appid, secret: {{env: QUERY_KEY}}}}
  h:
    mount: /h
    base_url: {apis['h']}
    credential: {{style: header, header: X-Api-Key, secret: {{env: HEADER_KEY}}}}
  b:
    mount: /b
    base_url: {apis['b']}
    credential: {{style: bearer, secret: {{file: {secret_dir}/token}}}}
  basic:
    mount: /basic
    base_url: {apis['basic']}
    methods: [GET, POST]
    credential: {{style: basic, username: reader, password: {{env: BASIC_PASSWORD}}}}
  o:
    mount: /o
    base_url: {apis['o']}
    credential: {{style: oauth2, token_url: {token_urls[0]}, client_id: test-client,
                  client_secret: {{env: CLIENT_SECRET}}, client_auth: form, scope: read}}
  o-down:
    mount: /o-down
    base_url: {apis['o']}
    credential: {{style: oauth2, token_url: {token_urls[1]}, client_id: test-client,
                  client_secret: {{env: CLIENT_SECRET}}}}
  down:
    mount: /down
    base_url: {closed}
    credential: {{style: query, secret: {{env: QUERY_KEY}}}}
  slow:
    mount: /slow
    base_url: {apis['slow']}
    timeout: 0.2
    credential: {{style: query, secret: {{env: TMDB_API_KEY}}}}
  missing:
    mount: /missing
    base_url: {apis['h']}
    credential: {{style: bearer, secret: {{env: NOT_SET}}}}
  tmdb:
    type: tmdb
    base_url: {apis['tmdb']}
"""


@pytest_twisted.ensureDeferred
async def test_no_secret_in_anything_the_ambassador_writes(tmp_path):
    endpoint, failing = FakeOAuth2TokenEndpoint(), FakeOAuth2TokenEndpoint(fault="error")
    fakes = {
        "q": FakeAPI(accept=lambda r: r.param("appid") == "query-secret",
                     answers={"/v1/items/busy": (429, {"error": "slow down"}), "/v1/items/broken": (500, {})}),
        "h": FakeAPI(accept=lambda r: r.headers.get("x-api-key") == "header-secret"),
        "b": FakeAPI(accept=bearer("bearer-secret")),
        "basic": FakeAPI(accept=lambda r: r.headers.get("authorization") == "Basic cmVhZGVyOmJhc2ljLXBhc3N3b3Jk"),
        "o": FakeAPI(accept=lambda r: r.headers.get("authorization", "")[7:] in set(endpoint.issued) - endpoint.revoked),
        "slow": FakeTMDB(fault="hang"),
        "tmdb": FakeTMDB(),
    }
    ports = {name: serve(fake) for name, fake in fakes.items()}
    token_ports = [serve(endpoint), serve(failing)]
    closed = serve(FakeTMDB())
    await closed.stopListening()
    secrets = tmp_path / "secret"
    secrets.mkdir()
    kubelet_secret_volume(secrets, {"token": "bearer-secret"}, "..2026_11_26_10_00_00.1")
    (tmp_path / "ambassador.yaml").write_text(config(
        {name: port.base_url for name, port in ports.items()},
        [port.base_url + "/oauth2/token" for port in token_ports], closed.base_url, secrets))

    process = spawn_ambassador("--port", "0", "--admin-port", "tcp:0:interface=127.0.0.1", "--log-format", "json",
                               "--config", str(tmp_path / "ambassador.yaml"), env=ENVIRON, cwd=tmp_path)
    written = []  # every byte of every answer

    async def call(path, status, method="GET", admin=False, **kwargs):
        response = await treq.request(method, (admin_url if admin else url) + path, persistent=False, **kwargs)
        body = await response.content()
        written.append(repr(list(response.headers.getAllRawHeaders())).encode() + body)
        assert response.code == status, (path, body)
        return body

    try:
        port = await process.listening
        url = f"http://127.0.0.1:{port}"
        cmdline = open(f"/proc/{process.transport.pid}/cmdline", "rb").read()
        admin_url = f"http://127.0.0.1:{await process.admin_listening}"

        # success, every style, callers' own credentials dropped
        await call("/q/items/1?appid=caller-own-key", 200)
        await call("/h/x", 200, headers={"X-Api-Key": "caller-own-key"})
        await call("/b/x", 200, headers={"Authorization": "Bearer caller-own-key"})
        await call("/basic/x", 200, method="POST", data=b"{}", headers={"Content-Type": "application/json"})
        await call("/o/x", 200)
        await call("/tmdb/3/movie/550?api_key=caller-own-key", 200)
        # every error path
        await call("/q/items/busy", 429)
        await call("/q/items/broken", 502)
        await call("/q/other", 404)
        await call("/q/items/%2e%2e", 400)
        await call("/h/x", 405, method="POST")
        await call("/nowhere", 404)
        await call("/down/x?api_key=caller-own-key", 502)
        await call("/slow/x", 504)
        await call("/missing/x", 503)
        await call("/o-down/x", 503)
        fakes["h"].accept = lambda r: False
        await call("/h/x", 502)
        endpoint.revoke()
        await call("/o/x", 200)  # 401, a new token, the retry
        assert len(endpoint.requests) == 2
        # rotation: the kubelet swaps ..data; the running process picks it up within 2 s
        fakes["b"].accept = bearer("rotated-bearer-secret")
        kubelet_secret_volume(secrets, {"token": "rotated-bearer-secret"}, "..2026_11_26_10_05_00.2")
        deadline = reactor.seconds() + 2
        while b'ambassador_credential_reloads_total{adapter="b"} 1.0' not in await call("/metrics", 200, admin=True):
            assert reactor.seconds() < deadline, "rotation not seen within 2 s"
        await call("/b/x", 200)
        os.unlink(secrets / "..data")  # the Secret vanishes: last good value kept, readiness warns
        while b"using the last good value" not in await call("/readyz", 503, admin=True):
            assert reactor.seconds() < deadline + 2
        await call("/b/x", 200)
    finally:
        process.transport.signalProcess(signal.SIGTERM)
        for p in [*ports.values(), *token_ports]:
            p.stopListening()
    assert await process.ended == (0, None)
    help_text, _ = await run_twistd("ambassador", "--help", env=ENVIRON, cwd=tmp_path)

    everything = b"\n".join([process.output, cmdline, help_text.encode(), *written])
    assert b"ambassador.access" in process.output and b"rotated-bearer-secret" not in b"".join(written)
    for secret in (*SECRETS, *endpoint.issued):
        assert secret.encode() not in everything, f"{secret} leaked"
    assert b"Traceback" not in everything
