"""Every error the ambassador maps, over real HTTP: problem+json with the right status, and no secret."""

import json

import pytest
import pytest_twisted
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock

from ambassador.pipeline.resilience import Policy
from ambassador.testing import serve
from conftest import get, header, tmdb_env

KEY = {"TMDB_API_KEY": "test-api-key"}
# These tests are about how one answer is mapped; retries are tested in test_resilience.py.
NO_RETRIES = {"tmdb": Policy(retries=0)}


def problem(response, body, status, kind):
    assert response.code == status
    assert header(response, "content-type") == "application/problem+json"
    document = json.loads(body)
    assert document["status"] == status
    assert document["type"] == f"urn:ambassador:problem:{kind}"
    assert document["title"] and document["detail"]
    assert b"test-api-key" not in body and b"test-read-token" not in body
    # The caller learns which service failed, never where it is (every upstream here is 127.0.0.1 or .invalid).
    assert "127.0.0.1" not in document["detail"] and ".invalid" not in document["detail"]
    return document


@pytest_twisted.ensureDeferred
async def test_no_credential_is_503_naming_the_variables(fake_tmdb, start_ambassador):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb))
    url = ambassador.url
    document = problem(*await get(url + "/movies"), 503, "credential-missing")
    assert "TMDB_API_KEY" in document["detail"] and "TMDB_READ_ACCESS_TOKEN" in document["detail"]
    assert fake_tmdb.requests == []


@pytest_twisted.ensureDeferred
async def test_missing_secret_file_is_503_naming_the_file(fake_tmdb, start_ambassador, tmp_path):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, TMDB_API_KEY_FILE=str(tmp_path / "absent")))
    url = ambassador.url
    document = problem(*await get(url + "/movies"), 503, "credential-missing")
    assert str(tmp_path / "absent") in document["detail"]


@pytest_twisted.ensureDeferred
async def test_refused_connection_is_502(start_ambassador, fake_tmdb):
    closed = serve(fake_tmdb)
    base_url = closed.base_url
    await closed.stopListening()
    ambassador = await start_ambassador({"TMDB_BASE_URL": base_url, **KEY}, policies=NO_RETRIES)
    url = ambassador.url
    document = problem(*await get(url + "/movies"), 502, "upstream-unreachable")
    assert "connection refused" in document["detail"]


@pytest_twisted.ensureDeferred
async def test_unknown_host_is_502(start_ambassador):
    ambassador = await start_ambassador({"TMDB_BASE_URL": "http://tmdb.invalid", **KEY}, policies=NO_RETRIES)
    document = problem(*await get(ambassador.url + "/movies"), 502, "upstream-unreachable")
    assert "host name not found" in document["detail"]


@pytest_twisted.ensureDeferred
async def test_connection_reset_is_502_and_serving_goes_on(fake_tmdb, start_ambassador):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, **KEY), policies=NO_RETRIES)
    url = ambassador.url
    fake_tmdb.fault = "reset"
    problem(*await get(url + "/movies"), 502, "upstream-unreachable")
    fake_tmdb.fault = None
    response, _ = await get(url + "/movies")
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_upstream_timeout_is_504(fake_tmdb, start_ambassador):
    clock = Clock()
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, **KEY), clock=clock)
    url = ambassador.url
    fake_tmdb.fault = "hang"
    arrived = fake_tmdb.next_request()
    answer = ensureDeferred(get(url + "/movies"))
    await arrived
    clock.advance(9.9)
    assert not answer.called
    clock.advance(0.1)
    document = problem(*await answer, 504, "upstream-timeout")
    assert "10 s" in document["detail"]


@pytest.mark.parametrize("status_code", [3, 7, 10])
@pytest_twisted.ensureDeferred
async def test_rejected_credential_is_502(fake_tmdb, start_ambassador, status_code):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, **KEY))
    url = ambassador.url
    body = json.dumps({"status_code": status_code, "status_message": "no", "success": False}).encode()
    fake_tmdb.canned = (401, {"Content-Type": "application/json;charset=utf-8"}, body)
    document = problem(*await get(url + "/movies"), 502, "credential-rejected")
    assert "credential configured in the ambassador" in document["detail"]


@pytest_twisted.ensureDeferred
async def test_wrong_key_is_credential_rejected(fake_tmdb, start_ambassador):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, TMDB_READ_ACCESS_TOKEN="caller-own-key"))
    url = ambassador.url
    problem(*await get(url + "/tmdb/3/movie/550"), 502, "credential-rejected")


@pytest.mark.parametrize(
    "canned",
    [
        (200, {"Content-Type": "text/html"}, b"<html>maintenance</html>"),
        (200, {"Content-Type": "application/json"}, b"<html>maintenance</html>"),
        (200, {"Content-Type": "application/json"}, b""),
        (404, {"Content-Type": "text/html"}, b"<html>not here</html>"),
        (400, {"Content-Type": "application/json"}, b"{not json"),
        (302, {"Location": "https://elsewhere.example/?api_key=x"}, b""),
    ],
)
@pytest_twisted.ensureDeferred
async def test_answers_tmdb_never_sends_are_502(fake_tmdb, start_ambassador, canned):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, **KEY))
    url = ambassador.url
    fake_tmdb.canned = canned
    response, body = await get(url + "/movies")
    problem(response, body, 502, "upstream-bad-answer")
    assert header(response, "location") is None


@pytest.mark.parametrize(
    "status, expected, kind",
    [(429, 429, "upstream-rate-limited"), (500, 502, "upstream-error"), (502, 502, "upstream-error"),
     (503, 503, "upstream-unavailable"), (504, 504, "upstream-timeout")],
)
@pytest_twisted.ensureDeferred
async def test_outside_failures_map_to_gateway_statuses(fake_tmdb, start_ambassador, status, expected, kind):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, **KEY), policies=NO_RETRIES)
    url = ambassador.url
    body = json.dumps({"status_code": 25, "status_message": "Your request count (41) is over the allowed limit of (40)."})
    fake_tmdb.canned = (status, {"Content-Type": "application/json", "Retry-After": "3"}, body.encode())
    response, body = await get(url + "/movies")
    problem(response, body, expected, kind)
    if status in (429, 503):
        assert header(response, "retry-after") == "3"


@pytest_twisted.ensureDeferred
async def test_callers_mistakes_pass_through_unchanged(fake_tmdb, start_ambassador):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, **KEY))
    url = ambassador.url
    response, body = await get(url + "/tmdb/3/movie/999999999")
    assert response.code == 404
    assert json.loads(body)["status_code"] == 34
    assert header(response, "content-type") == "application/json;charset=utf-8"
    response, body = await get(url + "/movies?page=0")
    assert response.code == 400
    assert json.loads(body)["status_code"] == 22


@pytest.mark.parametrize("path", ["/", "/nope", "/movies/extra", "/tmdb", "/tmdb/3", "/tmdb/4/movie/550",
                                  "/tmdb/movie/550"])
@pytest_twisted.ensureDeferred
async def test_unknown_paths_are_404(fake_tmdb, start_ambassador, path):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, **KEY))
    url = ambassador.url
    problem(*await get(url + path), 404, "not-found")
    assert fake_tmdb.requests == []


@pytest.mark.parametrize("path", ["/tmdb/3/movie/%2e%2e", "/tmdb/3/movie/..", "/tmdb/3/movie%2f550",
                                  "/tmdb/3//movie", "/tmdb/3/movie/5%00"])
@pytest_twisted.ensureDeferred
async def test_paths_that_could_escape_are_400(fake_tmdb, start_ambassador, path):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, **KEY))
    url = ambassador.url
    problem(*await get(url + path), 400, "bad-path")
    assert fake_tmdb.requests == []


@pytest_twisted.ensureDeferred
async def test_invalid_query_is_400(fake_tmdb, start_ambassador):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, **KEY))
    url = ambassador.url
    problem(*await get(url + "/movies?query=%ff"), 400, "bad-query")


@pytest.mark.parametrize("method", ["POST", "DELETE", "PUT"])
@pytest_twisted.ensureDeferred
async def test_other_methods_are_405_with_allow(fake_tmdb, start_ambassador, method):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, **KEY))
    url = ambassador.url
    response, body = await get(url + "/tmdb/3/movie/550", method=method)
    problem(response, body, 405, "method-not-allowed")
    assert header(response, "allow") == "GET, HEAD"
    assert fake_tmdb.requests == []


@pytest_twisted.ensureDeferred
async def test_https_upstream_with_an_untrusted_certificate_is_refused(fake_tmdb, start_ambassador):
    from twisted.internet import reactor, ssl

    from ambassador.testing import QuietSite

    key = ssl.KeyPair.generate(size=2048)
    certificate = ssl.PrivateCertificate.fromCertificateAndKeyPair(key.selfSignedCert(1, CN="127.0.0.1"), key)
    port = reactor.listenSSL(0, QuietSite(fake_tmdb), certificate.options(), interface="127.0.0.1")
    try:
        ambassador = await start_ambassador({"TMDB_BASE_URL": f"https://127.0.0.1:{port.getHost().port}", **KEY})
        url = ambassador.url
        document = problem(*await get(url + "/movies"), 502, "upstream-unreachable")
        assert "TLS" in document["detail"]
        assert fake_tmdb.requests == []  # the key never went over the untrusted connection
    finally:
        await port.stopListening()
