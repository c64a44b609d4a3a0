"""Trust and client certificates: a throwaway CA and TLS upstreams on loopback, through the real client."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor, ssl
from twisted.python import usage

from ambassador.app.service import Options
from ambassador.credentials.sources import PEMFileSecret
from ambassador.exchange import UpstreamRequest
from ambassador.interfaces import ConfigurationError
from ambassador.pipeline.client import UpstreamClient, UpstreamFailed
from ambassador.pipeline.egress import Egress
from ambassador.pipeline.trust import read_ca_file
from ambassador.testing import FakeAPI, QuietSite
from certificates import ThrowawayCA
from conftest import adapters_from_yaml

GET = UpstreamRequest("GET", "/status")


@pytest.fixture
def ca():
    return ThrowawayCA()


@pytest_twisted.async_yield_fixture
async def client():
    clients = []

    def make(**kwargs) -> UpstreamClient:
        clients.append(UpstreamClient(reactor, **kwargs))
        return clients[-1]

    yield make
    for made in clients:
        await made.close()


@pytest.fixture
def upstream():
    """``upstream(issued, client_ca=None)``: a FakeAPI over TLS on loopback; returns (api, https URL for localhost)."""
    ports = []

    def start(issued, client_ca: ThrowawayCA | None = None):
        api = FakeAPI(accept=lambda request: True)
        server = ssl.PrivateCertificate.loadPEM(issued.pem)
        asks = ({"verify": True, "requireCertificate": True,
                 "caCerts": [ssl.Certificate.loadPEM(client_ca.pem).original]} if client_ca is not None else {})
        options = ssl.CertificateOptions(privateKey=server.privateKey.original, certificate=server.original, **asks)
        ports.append(reactor.listenSSL(0, QuietSite(api), options, interface="127.0.0.1"))
        return api, f"https://localhost:{ports[-1].getHost().port}"

    yield start
    for port in ports:
        port.stopListening()


def trusting(ca: ThrowawayCA, **egress) -> Egress:
    return Egress(ca_certificates=(ssl.Certificate.loadPEM(ca.pem),), **egress)


async def refused(call) -> str:
    with pytest.raises(UpstreamFailed) as failed:
        await call
    return failed.value.reason


@pytest_twisted.ensureDeferred
async def test_a_private_ca_is_trusted_and_unverified_wrong_name_and_expired_still_refused(ca, client, upstream):
    _, url = upstream(ca.issue("localhost"))
    assert (await client().fetch(url, GET, egress=trusting(ca))).status == 200
    assert (await client().fetch(url, GET, egress=trusting(ca, ca_only=True))).status == 200
    process_wide = client(ca_certificates=(ssl.Certificate.loadPEM(ca.pem),))  # --ca-file
    assert (await process_wide.fetch(url, GET)).status == 200
    assert (await refused(client().fetch(url, GET))).startswith("the TLS handshake failed")  # the system's store
    assert (await refused(client().fetch(url, GET, egress=trusting(ThrowawayCA())))).startswith("the TLS handshake")
    _, wrong_name = upstream(ca.issue("api.example.test"))
    assert (await refused(client().fetch(wrong_name, GET, egress=trusting(ca)))).startswith("the TLS handshake")
    _, expired = upstream(ca.issue("localhost", expired=True))
    assert (await refused(client().fetch(expired, GET, egress=trusting(ca)))).startswith("the TLS handshake")


@pytest.mark.parametrize("variable", ["SSL_CERT_FILE", "SSL_CERT_DIR"])
@pytest_twisted.ensureDeferred
async def test_ssl_cert_file_and_dir_are_honoured(ca, client, upstream, tmp_path, monkeypatch, variable):
    _, url = upstream(ca.issue("localhost"))
    if variable == "SSL_CERT_FILE":
        (tmp_path / "bundle.pem").write_bytes(ca.pem)
        monkeypatch.setenv(variable, str(tmp_path / "bundle.pem"))
    else:  # a hashed directory, as c_rehash makes it
        certificate = ssl.Certificate.loadPEM(ca.pem).original
        (tmp_path / f"{certificate.subject_name_hash():08x}.0").write_bytes(ca.pem)
        monkeypatch.setenv(variable, str(tmp_path))
    assert (await client().fetch(url, GET)).status == 200


@pytest_twisted.ensureDeferred
async def test_a_client_certificate_the_upstream_requires_is_presented_and_a_rotated_one_picked_up(
        ca, client, upstream, tmp_path):
    clients_ca = ThrowawayCA("clients")
    _, url = upstream(ca.issue("localhost"), client_ca=clients_ca)
    assert (await refused(client().fetch(url, GET, egress=trusting(ca)))).startswith("the TLS handshake failed")
    stranger = ThrowawayCA("strangers").issue("ambassador", client=True)
    (tmp_path / "tls.crt").write_bytes(stranger.certificate_pem)
    (tmp_path / "tls.key").write_bytes(stranger.key_pem)
    egress = trusting(ca, client_cert=PEMFileSecret(str(tmp_path / "tls.crt")),
                      client_key=PEMFileSecret(str(tmp_path / "tls.key")))
    mutual = client()
    assert (await refused(mutual.fetch(url, GET, egress=egress))).startswith("the TLS handshake failed")
    rotated = clients_ca.issue("ambassador", client=True)  # a Secret's files replaced, as the kubelet does
    (tmp_path / "tls.key.new").write_bytes(rotated.key_pem)
    (tmp_path / "tls.crt.new").write_bytes(rotated.certificate_pem)
    (tmp_path / "tls.key.new").rename(tmp_path / "tls.key")
    (tmp_path / "tls.crt.new").rename(tmp_path / "tls.crt")
    assert (await mutual.fetch(url, GET, egress=egress)).status == 200


def test_a_bad_ca_file_stops_startup_with_one_line_naming_the_option(tmp_path):
    (tmp_path / "not-pem").write_text("just-some-secret-text\n")
    for path in (tmp_path / "missing.pem", tmp_path / "not-pem"):
        with pytest.raises(usage.UsageError) as refused:
            Options().parseOptions(["--ca-file", str(path)])
        message = str(refused.value)
        assert message.startswith("--ca-file: the file") and "\n" not in message
        assert str(tmp_path) not in message and "just-some-secret-text" not in message


def test_config_file_trust_keys_are_checked(tmp_path, ca):
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    assert read_ca_file(str(tmp_path / "ca.pem"), "x")[0].dump() == ssl.Certificate.loadPEM(ca.pem).dump()
    entry = ("adapters:\n  films:\n    mount: /films\n    base_url: https://api.example.test\n"
             "    credential: {style: bearer, secret: {env: API_TOKEN}}\n")
    for extra, expected in [("    ca_only: true\n", "adapters.films.ca_only: expected true only with ca_file"),
                            ("    ca_file: relative.pem\n", "adapters.films.ca_file: expected the absolute path"),
                            (f"    ca_file: {tmp_path}/none.pem\n", "adapters.films.ca_file: the file cannot be read"),
                            ("    client_cert: {file: /run/tls.crt}\n", "adapters.films.client_key: expected set "
                                                                          "together with client_cert")]:
        with pytest.raises(ConfigurationError) as raised:
            adapters_from_yaml(tmp_path, entry + extra, {"API_TOKEN": "bearer-secret"})
        assert expected in str(raised.value)
    adapter, = adapters_from_yaml(tmp_path, entry + f"    ca_file: {tmp_path}/ca.pem\n    ca_only: true\n"
                                  "    client_cert: {env: TLS_CRT}\n    client_key: {file: /run/tls.key}\n",
                                  {"API_TOKEN": "bearer-secret", "TLS_CRT": "pem"})
    assert adapter.egress.ca_only and adapter.egress.client_cert.describe() == "environment variable TLS_CRT"
    assert isinstance(adapter.egress.client_key, PEMFileSecret)
