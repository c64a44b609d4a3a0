"""OAuth2 client credentials (RFC 6749 §4.4) over real HTTP: a fake token endpoint, token expiry on a Clock."""

import json
from urllib.parse import parse_qsl

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, DeferredList, ensureDeferred
from twisted.internet.task import Clock

from ambassador.credentials.sources import REFRESH_MARGIN
from ambassador.exchange import UpstreamRequest
from ambassador.testing import FakeAPI, FakeOAuth2TokenEndpoint, serve
from ambassador.pipeline.client import UpstreamClient
from conftest import adapters_from_yaml, get, header

ENVIRON = {"CLIENT_SECRET": "test-client-secret"}


def oauth2_config(api: str, token_url: str, client_auth: str = "basic") -> str:
    return f"""
adapters:
  api:
    mount: /api
    base_url: {api}
    credential:
      style: oauth2
      token_url: {token_url}
      client_id: test-client
      client_secret: {{env: CLIENT_SECRET}}
      client_auth: {client_auth}
      scope: read:forecasts read:alerts
      audience: https://api.example.com
"""


@pytest.fixture
def endpoint(serve_fake):
    endpoint = FakeOAuth2TokenEndpoint()
    endpoint.token_url = serve_fake(endpoint) + "/oauth2/token"
    yield endpoint
    endpoint.release()


@pytest.fixture
def api(serve_fake, endpoint):
    def accept(request):
        authorization = request.headers.get("authorization", "")
        return authorization.startswith("Bearer ") and endpoint.valid(authorization[len("Bearer "):])

    api = FakeAPI(accept=accept)
    api.base_url = serve_fake(api)
    return api


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def start(start_ambassador, tmp_path, api, endpoint, clock):
    async def start(client_auth="basic", token_url=None):
        adapters = adapters_from_yaml(tmp_path, oauth2_config(api.base_url, token_url or endpoint.token_url,
                                                              client_auth), ENVIRON)
        return await start_ambassador(adapters=adapters, clock=clock)
    return start


def problem(response, body, status, kind):
    assert response.code == status and header(response, "content-type") == "application/problem+json"
    document = json.loads(body)
    assert document["type"] == f"urn:ambassador:problem:{kind}"
    assert "127.0.0.1" not in document["detail"]  # the token endpoint is named in the log, not to the caller
    return document


@pytest.mark.parametrize("client_auth", ["basic", "form"])
@pytest_twisted.ensureDeferred
async def test_one_token_is_fetched_and_sent_as_bearer(client_auth, start, api, endpoint):
    ambassador = await start(client_auth)
    for _ in range(3):
        response, body = await get(ambassador.url + "/api/forecast")
        assert response.code == 200, body
    [asked] = endpoint.requests
    form = dict(parse_qsl(asked.body.decode()))
    assert (asked.method, asked.path) == ("POST", "/oauth2/token")
    assert asked.headers["content-type"] == "application/x-www-form-urlencoded"
    assert form["grant_type"] == "client_credentials"
    assert (form["scope"], form["audience"]) == ("read:forecasts read:alerts", "https://api.example.com")
    if client_auth == "basic":
        assert asked.headers["authorization"].startswith("Basic ") and "client_secret" not in form
    else:
        assert "authorization" not in asked.headers
        assert (form["client_id"], form["client_secret"]) == ("test-client", "test-client-secret")
    assert {r.headers["authorization"] for r in api.requests} == {"Bearer test-access-token-1"}


@pytest_twisted.ensureDeferred
async def test_token_is_used_until_shortly_before_it_expires(start, api, endpoint, clock):
    ambassador = await start()
    await get(ambassador.url + "/api/a")
    clock.advance(endpoint.expires_in - REFRESH_MARGIN - 1)
    response, _ = await get(ambassador.url + "/api/b")
    assert response.code == 200 and len(endpoint.requests) == 1
    clock.advance(2)
    response, _ = await get(ambassador.url + "/api/c")
    assert response.code == 200 and len(endpoint.requests) == 2
    assert api.requests[-1].headers["authorization"] == "Bearer test-access-token-2"


@pytest_twisted.ensureDeferred
async def test_requests_waiting_for_a_token_share_one_token_request(tmp_path, api, endpoint, clock):
    [adapter] = adapters_from_yaml(tmp_path, oauth2_config(api.base_url, endpoint.token_url), ENVIRON)
    client = UpstreamClient(reactor)
    adapter.credential.start(clock, client)
    endpoint.fault = "hold"
    arrived = endpoint.next_request()
    waiting = [adapter.credential.attach(UpstreamRequest("GET", f"/{n}"), "api") for n in range(5)]
    waiting[0].cancel()  # a caller that went away does not spoil it for the others
    await arrived
    endpoint.release()
    results = await DeferredList(waiting, consumeErrors=True)
    assert results[0][1].check(CancelledError)
    assert [r.headers["Authorization"] for _, r in results[1:]] == ["Bearer test-access-token-1"] * 4
    assert len(endpoint.requests) == 1
    adapter.credential.stop()
    await client.close()


@pytest_twisted.ensureDeferred
async def test_401_with_a_cached_token_refreshes_it_once_and_retries_once(start, api, endpoint, log_events):
    ambassador = await start()
    await get(ambassador.url + "/api/a")
    endpoint.revoke()  # the API no longer takes token 1, long before it expires
    response, body = await get(ambassador.url + "/api/b")
    assert response.code == 200, body
    assert [r.headers["authorization"] for r in api.requests] == [
        "Bearer test-access-token-1", "Bearer test-access-token-1", "Bearer test-access-token-2"]
    assert len(endpoint.requests) == 2
    [access] = [e for e in log_events if e.get("log_namespace") == "ambassador.access" and e["path"] == "/api/b"]
    assert access["attempts"] == 2


@pytest_twisted.ensureDeferred
async def test_an_api_that_refuses_every_token_gets_one_retry_then_502(start, api, endpoint):
    ambassador = await start()
    api.accept = lambda request: False
    problem(*await get(ambassador.url + "/api/a"), 502, "credential-rejected")
    assert len(api.requests) == 2 and len(endpoint.requests) == 2


@pytest.mark.parametrize("fault, status, kind, said", [
    ("error", 503, "token-endpoint-unavailable", "answered status 500"),
    ("reject", 502, "token-request-rejected", "(error invalid_client)"),
])
@pytest_twisted.ensureDeferred
async def test_a_failing_token_endpoint_is_a_clear_problem(fault, status, kind, said, start, api, endpoint):
    ambassador = await start()
    endpoint.fault = fault
    document = problem(*await get(ambassador.url + "/api/a"), status, kind)
    assert said in document["detail"] and "OAuth2 access token for api" in document["detail"]
    assert api.requests == []
    response, body = await get(ambassador.admin_url + "/readyz")
    [warning] = json.loads(body)["adapters"]["api"]["warnings"]
    assert "token request failed" in warning and said in warning
    endpoint.fault = None
    response, _ = await get(ambassador.url + "/api/a")
    assert response.code == 200  # the next request asks again
    response, body = await get(ambassador.admin_url + "/readyz")
    assert "warnings" not in json.loads(body)["adapters"]["api"]


@pytest_twisted.ensureDeferred
async def test_an_unreachable_token_endpoint_is_502(start, api, endpoint):
    closed = serve(endpoint)
    await closed.stopListening()
    ambassador = await start(token_url=closed.base_url + "/token")
    document = problem(*await get(ambassador.url + "/api/a"), 502, "token-endpoint-failed")
    assert "could not connect (connection refused)" in document["detail"]


@pytest_twisted.ensureDeferred
async def test_a_token_endpoint_that_does_not_answer_times_out(start, api, endpoint, clock):
    ambassador = await start()
    endpoint.fault = "hold"
    arrived = endpoint.next_request()
    answer = ensureDeferred(get(ambassador.url + "/api/a"))
    await arrived
    clock.advance(10)
    document = problem(*await answer, 502, "token-endpoint-failed")
    assert "did not answer within 10 s" in document["detail"]


@pytest_twisted.ensureDeferred
async def test_without_the_client_secret_it_is_503_naming_the_variable(start_ambassador, tmp_path, api, endpoint):
    adapters = adapters_from_yaml(tmp_path, oauth2_config(api.base_url, endpoint.token_url), {})
    ambassador = await start_ambassador(adapters=adapters)
    document = problem(*await get(ambassador.url + "/api/a"), 503, "credential-missing")
    assert "environment variable CLIENT_SECRET has no value" in document["detail"]
    assert endpoint.requests == []
