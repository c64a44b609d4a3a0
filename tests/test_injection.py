"""Each injection style of the generic http adapter, over real HTTP against a fake API that checks it."""

import json

import pytest
import pytest_twisted

from ambassador.testing import FakeAPI
from conftest import adapters_from_yaml, get, header

CALLER_CREDENTIALS = {"Authorization": "Bearer caller-own-key", "X-Api-Key": "caller-own-key"}

STYLES = {
    "query": ("{style: query, param: appid, secret: {env: QUERY_KEY}}", {"QUERY_KEY": "query-secret"},
              lambda r: r.param("appid") == "query-secret" and dict(r.query).get("q") == "rain"),
    "header": ("{style: header, header: X-Api-Key, prefix: 'Key ', secret: {env: HEADER_KEY}}",
               {"HEADER_KEY": "header-secret"}, lambda r: r.headers.get("x-api-key") == "Key header-secret"),
    "bearer": ("{style: bearer, secret: {file: SECRET_FILE}}", {},
               lambda r: r.headers.get("authorization") == "Bearer bearer-secret"),
    "basic": ("{style: basic, username: reader, password: {env: BASIC_PASSWORD}}", {"BASIC_PASSWORD": "basic-password"},
              lambda r: r.headers.get("authorization") == "Basic cmVhZGVyOmJhc2ljLXBhc3N3b3Jk"),
}


def config(base_url: str, credential: str, **extra: str) -> str:
    lines = "".join(f"    {key}: {value}\n" for key, value in extra.items())
    return f"adapters:\n  api:\n    mount: /api\n    base_url: {base_url}/v2\n    credential: {credential}\n{lines}"


@pytest.mark.parametrize("style", sorted(STYLES))
@pytest_twisted.ensureDeferred
async def test_each_style_is_sent_as_configured_and_the_callers_own_is_dropped(
        style, serve_fake, start_ambassador, tmp_path):
    credential, environ, accept = STYLES[style]
    (tmp_path / "bearer").write_text("bearer-secret\n")
    fake = FakeAPI(accept=accept)
    adapters = adapters_from_yaml(tmp_path, config(serve_fake(fake), credential.replace(
        "SECRET_FILE", str(tmp_path / "bearer"))), environ)
    ambassador = await start_ambassador(adapters=adapters)

    query = "?q=rain&appid=caller-own-key" if style == "query" else "?q=rain"
    response, body = await get(ambassador.url + "/api/weather/today" + query, headers=CALLER_CREDENTIALS)
    assert response.code == 200, body
    assert json.loads(body)["path"] == "/v2/weather/today"
    [sent] = fake.requests
    assert "caller-own-key" not in repr(sent)
    assert dict(sent.query).get("q") == "rain"


@pytest.mark.parametrize("style", sorted(STYLES))
@pytest_twisted.ensureDeferred
async def test_a_credential_the_api_refuses_is_502_credential_rejected(style, serve_fake, start_ambassador, tmp_path):
    credential, environ, _ = STYLES[style]
    (tmp_path / "bearer").write_text("bearer-secret\n")
    fake = FakeAPI(accept=lambda r: False)
    adapters = adapters_from_yaml(tmp_path, config(serve_fake(fake), credential.replace(
        "SECRET_FILE", str(tmp_path / "bearer"))), environ)
    ambassador = await start_ambassador(adapters=adapters)
    response, body = await get(ambassador.url + "/api/x")
    assert response.code == 502 and header(response, "content-type") == "application/problem+json"
    assert json.loads(body)["type"] == "urn:ambassador:problem:credential-rejected"
    assert len(fake.requests) == 1  # a fixed secret is not retried


@pytest_twisted.ensureDeferred
async def test_an_unset_variable_is_503_naming_it(serve_fake, start_ambassador, tmp_path):
    fake = FakeAPI(accept=lambda r: True)
    adapters = adapters_from_yaml(tmp_path, config(serve_fake(fake), STYLES["query"][0]), {})
    ambassador = await start_ambassador(adapters=adapters)
    response, body = await get(ambassador.url + "/api/x")
    document = json.loads(body)
    assert response.code == 503 and document["type"] == "urn:ambassador:problem:credential-missing"
    assert "QUERY_KEY" in document["detail"] and "adapters.api.credential" in document["detail"]
    assert fake.requests == []
