"""Egress: forward proxies (CONNECT tunnels, absolute-form http, NO_PROXY), private trust and client
certificates, against a Twisted forward proxy, a real tinyproxy and TLS upstreams on loopback."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import pytest_twisted
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python import usage

from ambassador.app.service import Options
from ambassador.interfaces import ConfigurationError
from ambassador.pipeline.proxies import DIRECT, NoProxy, ProxyEnvironment, parse_proxy_url
from ambassador.testing import FakeAPI, FakeOAuth2TokenEndpoint, QuietSite
from certificates import ThrowawayCA
from conftest import adapters_from_yaml, get, reactor_turns_until, tmdb_env
from forward_proxy import ForwardProxy

TOKEN = {"API_TOKEN": "bearer-secret"}
PROXY_PASSWORD = "basic-password"  # in conftest's SECRETS: never in a log event
UPSTREAM_NAME = "api.example.test"  # resolved by the proxy alone


def adapter_yaml(base_url: str, **extra: str) -> str:
    lines = "".join(f"    {key}: {value}\n" for key, value in extra.items())
    return ("adapters:\n  films:\n    mount: /films\n"
            f"    base_url: {base_url}\n"
            "    credential: {style: bearer, secret: {env: API_TOKEN}}\n" + lines)


def bearer_api() -> FakeAPI:
    return FakeAPI(accept=lambda request: request.headers.get("authorization") == "Bearer bearer-secret")


@pytest.fixture
def forward_proxy():
    proxy = ForwardProxy()
    port = reactor.listenTCP(0, proxy, interface="127.0.0.1")
    proxy.port = port.getHost().port
    yield proxy
    proxy.close()
    port.stopListening()


@pytest.fixture
def ca():
    return ThrowawayCA()


@pytest.fixture
def serve_tls():
    """``serve_tls(resource, issued, client_ca=None)``: ``resource`` over TLS on loopback; returns the port."""
    ports = []

    def start(resource, issued, client_ca=None) -> int:
        server = ssl.PrivateCertificate.loadPEM(issued.pem)
        options = ssl.CertificateOptions(
            privateKey=server.privateKey.original, certificate=server.original,
            **({"verify": True, "requireCertificate": True, "caCerts": [ssl.Certificate.loadPEM(client_ca.pem).original]}
               if client_ca is not None else {}))
        ports.append(reactor.listenSSL(0, QuietSite(resource), options, interface="127.0.0.1"))
        return ports[-1].getHost().port

    yield start
    for port in ports:
        port.stopListening()


def ca_file(tmp_path, ca: ThrowawayCA):
    path = tmp_path / "ca.pem"
    path.write_bytes(ca.pem)
    return path


def https_through(proxy: ForwardProxy, port: int) -> str:
    proxy.hosts[UPSTREAM_NAME] = "127.0.0.1"
    return f"https://{UPSTREAM_NAME}:{port}"


# -- reading the environment -----------------------------------------------------------------------------

@pytest.mark.parametrize(("no_proxy", "host", "port", "direct"), [
    ("example.com", "example.com", 443, True),
    ("example.com", "api.example.com", 443, True),  # a bare domain covers its subdomains
    ("example.com", "badexample.com", 443, False),
    (".example.com", "api.example.com", 443, True),
    (".example.com", "example.com", 443, True),  # curl: the leading dot is optional
    ("*.example.com", "a.b.example.com", 443, True),
    ("EXAMPLE.com", "Api.Example.COM.", 443, True),
    ("10.0.0.0/8", "10.1.2.3", 443, True),
    ("10.0.0.0/8", "11.1.2.3", 443, False),
    ("192.168.1.5", "192.168.1.5", 80, True),
    ("::1", "::1", 443, True),
    ("fd00::/8", "fd12::1", 443, True),
    ("example.com:8443", "example.com", 8443, True),
    ("example.com:8443", "example.com", 443, False),
    ("[::1]:8080", "::1", 8080, True),
    (" a.test , example.com ", "example.com", 443, True),
    ("*", "anything.at.all", 443, True),
    ("", "example.com", 443, False),
    ("example.com", "127.0.0.1", 443, False),  # loopback is not implicitly direct (curl's rule)
])
def test_no_proxy_matches_as_curl_does(no_proxy, host, port, direct):
    assert NoProxy.parse(no_proxy).matches(host, port) is direct


def test_lower_case_wins_and_no_proxy_applies_to_both_schemes():
    proxies = ProxyEnvironment.from_environ({
        "HTTPS_PROXY": "http://upper:3128", "https_proxy": "lower:8080", "HTTP_PROXY": "http://plain.test",
        "NO_PROXY": "internal.test"})
    assert proxies.proxy_for("https", "api.test", 443).where == "lower:8080"
    assert proxies.proxy_for("http", "api.test", 80).where == "plain.test:1080"
    assert proxies.proxy_for("https", "x.internal.test", 443) is None
    assert ProxyEnvironment.from_environ({}) == DIRECT


def test_proxy_credentials_become_proxy_authorization_and_are_never_shown():
    proxy = parse_proxy_url("http://alice:basic%2Dpassword@proxy.test:3128", "HTTPS_PROXY")
    assert proxy.authorization == "Basic YWxpY2U6YmFzaWMtcGFzc3dvcmQ="
    assert proxy.where == "proxy.test:3128" and "basic" not in repr(proxy)


@pytest.mark.parametrize("value", ["socks5://alice:basic-password@proxy.test:1080", "http://proxy.test:99999",
                                   "http://alice:basic-password@proxy.test:3128/path", "http://"])
def test_a_bad_proxy_url_is_refused_without_repeating_it(value):
    with pytest.raises(ConfigurationError) as raised:
        parse_proxy_url(value, "HTTPS_PROXY")
    assert str(raised.value).startswith("HTTPS_PROXY: expected")
    assert "basic-password" not in str(raised.value) and "proxy.test" not in str(raised.value)


def test_a_bad_proxy_variable_stops_startup_with_one_line_naming_it(monkeypatch):
    monkeypatch.setenv("https_proxy", f"socks5://alice:{PROXY_PASSWORD}@proxy.test:1080")
    with pytest.raises(usage.UsageError) as refused:
        Options().parseOptions([])
    assert str(refused.value).startswith("https_proxy: expected an http:// proxy URL")
    assert PROXY_PASSWORD not in str(refused.value) and "\n" not in str(refused.value)


def test_a_proxy_password_written_in_the_config_file_is_refused(tmp_path):
    with pytest.raises(ConfigurationError) as raised:
        adapters_from_yaml(tmp_path, adapter_yaml("https://x.test", proxy="http://a:basic-password@p.test:3128"),
                           TOKEN)
    assert "adapters.films.proxy" in str(raised.value) and "basic-password" not in str(raised.value)


# -- through a forward proxy ------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_https_goes_through_a_connect_tunnel_with_tls_to_the_upstream_inside(
        forward_proxy, ca, serve_tls, start_ambassador, tmp_path, log_events):
    api = bearer_api()
    base_url = https_through(forward_proxy, serve_tls(api, ca.issue(UPSTREAM_NAME)))
    adapters = adapters_from_yaml(tmp_path, adapter_yaml(base_url, ca_file=ca_file(tmp_path, ca)), TOKEN)
    proxies = ProxyEnvironment.from_environ(
        {"HTTPS_PROXY": f"http://alice:{PROXY_PASSWORD}@127.0.0.1:{forward_proxy.port}"})
    ambassador = await start_ambassador(adapters=adapters, proxies=proxies)
    response, body = await get(ambassador.url + "/films/movies?page=2")
    assert response.code == 200, body
    assert json.loads(body)["path"] == "/movies"
    connect, = forward_proxy.seen
    assert (connect.method, connect.target) == ("CONNECT", f"{base_url[8:]}")
    assert connect.headers["proxy-authorization"] == "Basic YWxpY2U6YmFzaWMtcGFzc3dvcmQ="
    assert b"bearer-secret" not in forward_proxy.relayed and b"/movies" not in forward_proxy.relayed  # ciphertext
    assert api.requests[0].headers.get("proxy-authorization") is None  # only the proxy is told
    response, _ = await get(ambassador.url + "/films/movies")
    assert response.code == 200 and len(forward_proxy.seen) == 1  # the tunnel's connection was kept


@pytest_twisted.ensureDeferred
async def test_plain_http_is_sent_to_the_proxy_in_absolute_form(forward_proxy, serve_fake, start_ambassador,
                                                               tmp_path):
    api = bearer_api()
    base_url = serve_fake(api)
    adapters = adapters_from_yaml(tmp_path, adapter_yaml(base_url), TOKEN)
    proxies = ProxyEnvironment.from_environ(
        {"http_proxy": f"alice:{PROXY_PASSWORD}@127.0.0.1:{forward_proxy.port}"})
    ambassador = await start_ambassador(adapters=adapters, proxies=proxies)
    response, body = await get(ambassador.url + "/films/movies?page=2")
    assert response.code == 200, body
    seen, = forward_proxy.seen
    assert (seen.method, seen.target) == ("GET", f"{base_url}/movies?page=2")
    assert seen.headers["proxy-authorization"] == "Basic YWxpY2U6YmFzaWMtcGFzc3dvcmQ="
    assert len(api.requests) == 1


@pytest_twisted.ensureDeferred
async def test_no_proxy_and_proxy_none_go_direct(forward_proxy, serve_fake, start_ambassador, tmp_path):
    api = bearer_api()
    base_url = serve_fake(api)
    text = adapter_yaml(base_url) + ("  direct:\n    mount: /direct\n"
                                     f"    base_url: {base_url}\n    proxy: none\n"
                                     "    credential: {style: bearer, secret: {env: API_TOKEN}}\n")
    adapters = adapters_from_yaml(tmp_path, text, TOKEN)
    proxies = ProxyEnvironment.from_environ({"HTTP_PROXY": f"127.0.0.1:{forward_proxy.port}"})
    ambassador = await start_ambassador(adapters=adapters, proxies=proxies)
    assert (await get(ambassador.url + "/direct/a"))[0].code == 200
    assert forward_proxy.seen == [] and len(api.requests) == 1
    assert (await get(ambassador.url + "/films/a"))[0].code == 200  # same upstream, its own pool: proxied
    assert len(forward_proxy.seen) == 1 and len(api.requests) == 2
    exempt = ProxyEnvironment.from_environ({"HTTP_PROXY": f"127.0.0.1:{forward_proxy.port}", "NO_PROXY": "127.0.0.0/8"})
    ambassador = await start_ambassador(adapters=adapters_from_yaml(tmp_path, adapter_yaml(base_url), TOKEN),
                                        proxies=exempt)
    assert (await get(ambassador.url + "/films/a"))[0].code == 200
    assert len(forward_proxy.seen) == 1 and len(api.requests) == 3


@pytest.mark.parametrize("scheme", ["https", "http"])
@pytest_twisted.ensureDeferred
async def test_an_unreachable_proxy_is_a_502_naming_it_not_its_credentials(start_ambassador, tmp_path, scheme):
    adapters = adapters_from_yaml(tmp_path, adapter_yaml(f"{scheme}://{UPSTREAM_NAME}:8443"), TOKEN)
    proxies = ProxyEnvironment.from_environ({f"{scheme.upper()}_PROXY": f"http://alice:{PROXY_PASSWORD}@127.0.0.1:1"})
    ambassador = await start_ambassador(adapters=adapters, proxies=proxies, policies={})
    response, body = await get(ambassador.url + "/films/a")
    problem = json.loads(body)
    assert response.code == 502 and problem["type"].endswith("proxy-failed"), problem
    assert "the forward proxy 127.0.0.1:1" in problem["detail"] and "connection refused" in problem["detail"]
    assert PROXY_PASSWORD not in body.decode() and "alice" not in body.decode()
    assert UPSTREAM_NAME not in body.decode()


@pytest.mark.parametrize(("mode", "status"), [("refuse", 403), ("auth", 407)])
@pytest_twisted.ensureDeferred
async def test_a_refused_tunnel_is_a_502_with_the_proxys_status(forward_proxy, start_ambassador, tmp_path, mode,
                                                                status):
    forward_proxy.mode = mode
    adapters = adapters_from_yaml(tmp_path, adapter_yaml(f"https://{UPSTREAM_NAME}:8443"), TOKEN)
    proxies = ProxyEnvironment.from_environ({"HTTPS_PROXY": f"http://alice:{PROXY_PASSWORD}@127.0.0.1:{forward_proxy.port}"})
    ambassador = await start_ambassador(adapters=adapters, proxies=proxies)
    response, body = await get(ambassador.url + "/films/a")
    problem = json.loads(body)
    assert response.code == 502 and problem["type"].endswith("proxy-failed"), problem
    assert f"the forward proxy 127.0.0.1:{forward_proxy.port} refused the tunnel with status {status}" in problem["detail"]
    assert UPSTREAM_NAME not in body.decode() and "8443" not in body.decode() and PROXY_PASSWORD not in body.decode()


@pytest_twisted.ensureDeferred
async def test_a_plain_request_the_proxy_answers_407_is_a_502_not_the_upstreams_answer(forward_proxy, start_ambassador,
                                                                                     tmp_path):
    forward_proxy.mode = "auth"
    adapters = adapters_from_yaml(tmp_path, adapter_yaml(f"http://{UPSTREAM_NAME}:8080"), TOKEN)
    proxies = ProxyEnvironment.from_environ({"HTTP_PROXY": f"127.0.0.1:{forward_proxy.port}"})
    ambassador = await start_ambassador(adapters=adapters, proxies=proxies)
    response, body = await get(ambassador.url + "/films/a")
    problem = json.loads(body)
    assert response.code == 502 and problem["type"].endswith("proxy-failed"), problem
    assert "refused the request with status 407" in problem["detail"] and UPSTREAM_NAME not in body.decode()


@pytest_twisted.ensureDeferred
async def test_a_tunnel_that_stalls_is_a_504(forward_proxy, start_ambassador, tmp_path, clock):
    forward_proxy.mode = "stall"
    adapters = adapters_from_yaml(tmp_path, adapter_yaml(f"https://{UPSTREAM_NAME}:8443"), TOKEN)
    proxies = ProxyEnvironment.from_environ({"HTTPS_PROXY": f"127.0.0.1:{forward_proxy.port}"})
    ambassador = await start_ambassador(adapters=adapters, proxies=proxies, clock=clock, connect_timeout=3.0)
    answered: Deferred = ensureDeferred(get(ambassador.url + "/films/a"))
    await forward_proxy.next_request()
    clock.advance(2.9)
    assert not answered.called
    clock.advance(0.2)
    response, body = await answered
    problem = json.loads(body)
    assert response.code == 504 and problem["type"].endswith("proxy-timeout"), problem
    assert "did not answer the CONNECT request within 3 s" in problem["detail"]
    await reactor_turns_until(lambda: forward_proxy.connections[0].transport.disconnected)  # and dropped


TINYPROXY = shutil.which("tinyproxy")


@pytest.mark.skipif(TINYPROXY is None, reason="tinyproxy is not installed (./run-tests installs it as root)")
@pytest_twisted.ensureDeferred
async def test_through_a_real_tinyproxy(ca, serve_tls, start_ambassador, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        proxy_port = s.getsockname()[1]
    api = bearer_api()
    port = serve_tls(api, ca.issue("localhost"))
    config = tmp_path / "tinyproxy.conf"
    config.write_text(f"Port {proxy_port}\nListen 127.0.0.1\nTimeout 30\nAllow 127.0.0.1\nConnectPort {port}\n"
                      f"BasicAuth alice {PROXY_PASSWORD}\nLogLevel Info\nLogFile \"{tmp_path}/tinyproxy.log\"\n"
                      f"PidFile \"{tmp_path}/tinyproxy.pid\"\n")
    process = subprocess.Popen([TINYPROXY, "-d", "-c", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        adapters = adapters_from_yaml(
            tmp_path, adapter_yaml(f"https://localhost:{port}", ca_file=ca_file(tmp_path, ca), ca_only="true"), TOKEN)
        proxies = ProxyEnvironment.from_environ({"HTTPS_PROXY": f"http://alice:{PROXY_PASSWORD}@127.0.0.1:{proxy_port}"})
        ambassador = await start_ambassador(adapters=adapters, proxies=proxies)
        wrong = ProxyEnvironment.from_environ({"HTTPS_PROXY": f"http://alice:wrong@127.0.0.1:{proxy_port}"})
        refused = await start_ambassador(adapters=adapters, proxies=wrong)

        async def up() -> bool:
            response, _ = await get(ambassador.url + "/films/movies")
            return response.code == 200
        for _ in range(100):  # tinyproxy listens shortly after it starts: until then, a 502
            if await up():
                break
        response, body = await get(ambassador.url + "/films/movies")
        assert response.code == 200 and json.loads(body)["path"] == "/movies"
        assert len(api.requests) >= 1
        response, body = await get(refused.url + "/films/movies")
        # tinyproxy answers a wrong proxy password with 401 where the RFC says 407: its status, as it said it
        assert response.code == 502 and "refused the tunnel with status 401" in json.loads(body)["detail"]
    finally:
        process.terminate()
        process.wait(10)


@pytest_twisted.ensureDeferred
async def test_oauth2_token_requests_go_out_as_their_adapters_do(forward_proxy, serve_fake, start_ambassador,
                                                                 tmp_path):
    tokens = FakeOAuth2TokenEndpoint()
    token_url = serve_fake(tokens) + "/oauth/token"
    api = FakeAPI(accept=lambda request: tokens.valid(request.headers.get("authorization", "")[len("Bearer "):]))
    base_url = serve_fake(api)
    text = ("adapters:\n  films:\n    mount: /films\n"
            f"    base_url: {base_url}\n    proxy: http://127.0.0.1:{forward_proxy.port}\n"
            "    credential: {style: oauth2, client_id: test-client, client_secret: {env: CLIENT_SECRET}, "
            f"token_url: '{token_url}'}}\n")
    adapters = adapters_from_yaml(tmp_path, text, {"CLIENT_SECRET": "test-client-secret"})
    ambassador = await start_ambassador(adapters=adapters)  # the environment names no proxy: the adapter does
    response, body = await get(ambassador.url + "/films/a")
    assert response.code == 200, body
    assert [(seen.method, seen.target) for seen in forward_proxy.seen] == [
        ("POST", token_url), ("GET", f"{base_url}/a")]


@pytest_twisted.ensureDeferred
async def test_a_plugin_adapters_calls_and_its_probes_go_through_the_proxy(forward_proxy, fake_tmdb, start_ambassador,
                                                                          clock):
    proxies = ProxyEnvironment.from_environ({"HTTP_PROXY": f"127.0.0.1:{forward_proxy.port}"})
    probed = forward_proxy.next_request()
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, TMDB_API_KEY="test-api-key"), proxies=proxies,
                                        clock=clock, probe_interval=30)
    assert (await probed).target == fake_tmdb.base_url + "/3/configuration?api_key=test-api-key"
    response, _ = await get(ambassador.url + "/movies")
    assert response.code == 200
    assert forward_proxy.seen[-1].target.startswith(fake_tmdb.base_url + "/3/discover/movie?")
    assert len(fake_tmdb.requests) == 2
