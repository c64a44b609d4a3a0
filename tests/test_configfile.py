"""The config file: several adapters at once, the generic http adapter, and clear errors for bad files."""

import json

import pytest
import pytest_twisted
from attrs import asdict
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock

from ambassador.adapters.tmdb import TMDBAdapter, TMDBPlugin
from ambassador.app.configfile import adapters_from_file
from ambassador.interfaces import ConfigurationError
from ambassador.testing import FakeAPI
from conftest import adapters_from_yaml, get, header
from processes import run_twistd

QUERY_KEY = {"QUERY_KEY": "query-secret"}


def weather(base_url: str, **extra: str) -> str:
    lines = "".join(f"    {key}: {value}\n" for key, value in extra.items())
    return ("adapters:\n  weather:\n    mount: /weather\n"
            f"    base_url: {base_url}/data/2.5\n"
            "    credential: {style: query, param: appid, secret: {env: QUERY_KEY}}\n" + lines)


@pytest.fixture
def api(serve_fake):
    api = FakeAPI(accept=lambda request: request.param("appid") == "query-secret")
    api.base_url = serve_fake(api)
    return api


@pytest_twisted.ensureDeferred
async def test_only_the_allowed_methods_and_path_prefixes_are_forwarded(api, start_ambassador, tmp_path):
    adapters = adapters_from_yaml(tmp_path, weather(api.base_url, methods="[GET, POST]",
                                                    paths="[/weather, /forecast/daily]"), QUERY_KEY)
    ambassador = await start_ambassador(adapters=adapters)
    url = ambassador.url + "/weather"
    for path in ("/weather", "/weather/", "/forecast/daily/5"):
        response, body = await get(url + path + "?q=Oslo")
        assert response.code == 200, path
        assert json.loads(body)["path"] == "/data/2.5" + path.rstrip("/")
    assert dict(api.requests[0].query) == {"q": "Oslo", "appid": "query-secret"}
    for path in ("", "/weatherstation", "/forecast", "/forecast/hourly"):
        response, body = await get(url + path)
        assert response.code == 404 and "/weather/forecast/daily" in json.loads(body)["detail"]
    response, _ = await get(url + "/weather", method="DELETE")
    assert response.code == 405 and header(response, "allow") == "GET, POST"
    assert len(api.requests) == 3


@pytest_twisted.ensureDeferred
async def test_a_post_body_and_its_content_type_go_upstream(api, start_ambassador, tmp_path):
    import treq

    adapters = adapters_from_yaml(tmp_path, weather(api.base_url, methods="[POST]"), QUERY_KEY)
    ambassador = await start_ambassador(adapters=adapters)
    response = await treq.post(ambassador.url + "/weather/alerts", b'{"area": "Oslo"}',
                               headers={"Content-Type": "application/json", "Cookie": "session=1"}, persistent=False)
    assert response.code == 200 and json.loads(await response.content())["body"] == '{"area": "Oslo"}'
    [sent] = api.requests
    assert sent.headers["content-type"] == "application/json" and "cookie" not in sent.headers


@pytest_twisted.ensureDeferred
async def test_several_instances_and_tmdb_from_one_file(api, fake_tmdb, start_ambassador, tmp_path):
    text = weather(api.base_url) + f"""
  weather-eu:
    mount: /eu/weather
    base_url: {api.base_url}/eu
    credential: {{style: query, param: appid, secret: {{env: QUERY_KEY}}}}
  tmdb:
    type: tmdb
    base_url: {fake_tmdb.base_url}
"""
    adapters = adapters_from_yaml(tmp_path, text, {**QUERY_KEY, "TMDB_API_KEY": "test-api-key"})
    assert [adapter.name for adapter in adapters] == ["weather", "weather-eu", "tmdb"]
    ambassador = await start_ambassador(adapters=adapters)
    response, body = await get(ambassador.url + "/eu/weather/now")
    assert response.code == 200 and json.loads(body)["path"] == "/eu/now"
    response, body = await get(ambassador.url + "/weather/now")
    assert response.code == 200 and json.loads(body)["path"] == "/data/2.5/now"
    response, body = await get(ambassador.url + "/movies")
    assert response.code == 200 and b"Fight Club" in body  # TMDB_API_KEY still applies, base_url from the file


@pytest_twisted.ensureDeferred
async def test_a_plugin_credential_from_the_file_replaces_its_variables(fake_tmdb, start_ambassador, tmp_path):
    (tmp_path / "token").write_text("test-read-token")
    text = (f"adapters:\n  tmdb:\n    type: tmdb\n    base_url: {fake_tmdb.base_url}\n"
            f"    credential: {{style: bearer, secret: {{file: {tmp_path / 'token'}}}}}\n")
    adapters = adapters_from_yaml(tmp_path, text, {"TMDB_API_KEY": "wrong-key"})
    ambassador = await start_ambassador(adapters=adapters)
    response, _ = await get(ambassador.url + "/tmdb/3/movie/550")
    assert response.code == 200
    assert fake_tmdb.requests[0].headers["authorization"] == "Bearer test-read-token"
    assert fake_tmdb.requests[0].param("api_key") is None


@pytest_twisted.ensureDeferred
async def test_a_plugin_base_url_from_the_file_may_carry_a_path_prefix(fake_tmdb, start_ambassador, tmp_path):
    fake_tmdb.base_path = "/tmdb"
    text = f"adapters:\n  tmdb:\n    type: tmdb\n    base_url: {fake_tmdb.base_url}/tmdb\n"
    adapters = adapters_from_yaml(tmp_path, text, {"TMDB_API_KEY": "test-api-key"})
    ambassador = await start_ambassador(adapters=adapters)
    response, _ = await get(ambassador.url + "/tmdb/3/movie/550")
    assert response.code == 200
    assert [r.path for r in fake_tmdb.requests] == ["/tmdb/3/movie/550"]


class SmallTMDB(TMDBAdapter):
    max_response_bytes = 1000


class SmallTMDBPlugin(TMDBPlugin):
    def configure(self, environ, reactor):
        return SmallTMDB(**asdict(super().configure(environ, reactor), recurse=False))


@pytest_twisted.ensureDeferred
async def test_a_plugin_adapter_from_the_file_keeps_its_own_answer_size_limit(fake_tmdb, start_ambassador, tmp_path):
    path = tmp_path / "ambassador.yaml"
    path.write_text(f"adapters:\n  tmdb:\n    type: tmdb\n    base_url: {fake_tmdb.base_url}\n")
    adapters = adapters_from_file(str(path), {"TMDB_API_KEY": "test-api-key"}, [SmallTMDBPlugin()], reactor)
    ambassador = await start_ambassador(adapters=adapters)
    fake_tmdb.canned = (200, {"Content-Type": "application/json"}, b"[" + b" " * 999 + b"]")
    response, body = await get(ambassador.url + "/tmdb/3/movie/550")
    assert response.code == 502 and b"more than 1000 bytes" in body


@pytest_twisted.ensureDeferred
async def test_a_per_adapter_timeout_and_policy_override_the_defaults(fake_tmdb, start_ambassador, tmp_path):
    text = (f"adapters:\n  slow:\n    mount: /slow\n    base_url: {fake_tmdb.base_url}\n    timeout: 2.5\n"
            "    policy: {retries: 0}\n"
            "    credential: {style: query, secret: {env: KEY}}\n")
    clock = Clock()
    adapters = adapters_from_yaml(tmp_path, text, {"KEY": "test-api-key"})
    ambassador = await start_ambassador(adapters=adapters, clock=clock)
    fake_tmdb.fault = "hang"
    arrived = fake_tmdb.next_request()
    answer = ensureDeferred(get(ambassador.url + "/slow/3/movie/550"))
    await arrived
    clock.advance(2.5)
    response, body = await answer
    assert response.code == 504 and "within 2.5 s" in json.loads(body)["detail"]


@pytest.mark.parametrize("text, message", [
    ("adapters: [a, b]", "adapters: expected a mapping of adapter names to their settings"),
    ("adaptors: {}", "ambassador.yaml: adaptors: expected no such key here; the keys are adapters"),
    ("adapters:\n  w:\n    base_url: https://x.example\n    credential: {style: bearer, secret: {env: K}}",
     "adapters.w.mount: expected a path like /weather (required)"),
    ("adapters:\n  w:\n    mount: /w/../x\n    base_url: https://x.example\n", "adapters.w.mount: expected a path"),
    ("adapters:\n  w:\n    mount: /w\n    base_url: ftp://x.example/\n", "adapters.w.base_url: expected a URL like"),
    ("adapters:\n  w:\n    mount: /w\n    base_url: https://x.example/?key=1\n", "adapters.w.base_url: expected"),
    ("adapters:\n  w:\n    mount: /w\n    base_url: https://x.example\n    credential: {style: magic}",
     "adapters.w.credential.style: expected query | header | bearer | basic | oauth2"),
    ("adapters:\n  w:\n    mount: /w\n    base_url: https://x.example\n    credential: {style: bearer, secret: s3cr3t}",
     "adapters.w.credential.secret: expected {env: VARIABLE} or {file: /path}"),
    ("adapters:\n  w:\n    mount: /w\n    base_url: https://x.example\n    timeout: -1\n"
     "    credential: {style: bearer, secret: {env: K}}", "adapters.w.timeout: expected a positive number"),
    ("adapters:\n  w:\n    mount: /w\n    base_url: https://x.example\n    methods: [GET, BREW]\n"
     "    credential: {style: bearer, secret: {env: K}}", "adapters.w.methods: expected a list of methods"),
    ("adapters:\n  w:\n    mount: /w\n    base_url: https://x.example\n    retries: 3\n"
     "    credential: {style: bearer, secret: {env: K}}", "adapters.w.retries: expected no such key here"),
    ("adapters:\n  w:\n    mount: /w\n    base_url: https://x.example\n    policy: {retires: 3}\n"
     "    credential: {style: bearer, secret: {env: K}}", "adapters.w.policy: unknown policy key; known: "),
    ("adapters:\n  w:\n    type: soap\n", "adapters.w.type: expected http or an adapter plugin's name ("),
    ("adapters:\n  tmdb:\n    type: tmdb\n    mount: /films\n", "adapters.tmdb.mount: expected no such key"),
    ("adapters:\n  a:\n    mount: /w\n    base_url: https://x.example\n    credential: {style: bearer, secret: {env: K}}\n"
     "  b:\n    mount: /w/\n    base_url: https://x.example\n    credential: {style: bearer, secret: {env: K}}\n",
     "two adapters are mounted at /w"),
    ("adapters:\n  w: {mount: /w\n", "not valid YAML at line 3, column 1"),
])
def test_invalid_files_name_the_file_the_key_and_what_was_expected(tmp_path, text, message):
    with pytest.raises(ConfigurationError) as raised:
        adapters_from_yaml(tmp_path, text)
    assert str(raised.value).startswith(str(tmp_path / "ambassador.yaml") + ": ")
    assert message in str(raised.value)


def test_a_value_in_the_wrong_place_is_not_repeated_back(tmp_path):
    text = "adapters:\n  w:\n    mount: /w\n    base_url: https://x.example\n    credential: {style: bearer-secret}"
    with pytest.raises(ConfigurationError) as raised:
        adapters_from_yaml(tmp_path, text)
    assert "bearer-secret" not in str(raised.value)


@pytest_twisted.ensureDeferred
async def test_twistd_with_a_bad_file_stops_with_one_clear_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("adapters:\n  w:\n    mount: /w\n    base_url: https://x.example\n"
                                       "    credential: {style: bearer, secret: {env: K}, param: x}\n")
    output, code = await run_twistd("-n", "ambassador", "--config", str(tmp_path / "bad.yaml"), env={}, cwd=tmp_path)
    assert code != 0 and "Traceback" not in output
    assert f"{tmp_path / 'bad.yaml'}: adapters.w.credential.param: expected no such key here" in output
    output, code = await run_twistd("-n", "ambassador", "--config", str(tmp_path / "absent.yaml"), env={},
                                    cwd=tmp_path)
    assert code != 0 and "absent.yaml: cannot be read (No such file or directory)" in output


def test_every_example_in_the_docs_is_a_valid_file(tmp_path):
    import os
    import re

    top = os.path.join(os.path.dirname(__file__), "..")
    docs = "".join(open(os.path.join(top, name), encoding="utf-8").read()
                   for name in ("README.md", "docs/http-adapter.md"))
    examples = [block for block in re.findall(r"```yaml\n(.*?)```", docs, re.S) if block.startswith("adapters:")]
    assert len(examples) >= 5
    for example in examples:
        if "NAME:" not in example:  # the reference block is a template
            assert adapters_from_yaml(tmp_path, example)
