"""docs/writing-an-adapter.md followed literally: its files written out, installed, tested and served by twistd."""

import importlib.util
import json
import os
import re
import signal
import sys
from pathlib import Path

import pytest_twisted
from twisted.internet.utils import getProcessOutputAndValue

from ambassador.testing import serve
from conftest import get
from processes import BASE_ENV, run_twistd, spawn_ambassador

GUIDE = Path(__file__).parent.parent / "docs" / "writing-an-adapter.md"
# A file of the guide: its path in bold code, a blank line, then a fenced block.
_FILE_BLOCK = re.compile(r"^\*\*`([^`]+)`\*\*\n\n```\w*\n(.*?)^```$", re.M | re.S)


def guide_files() -> dict[str, str]:
    """Path → content; a file shown in several pieces is those pieces one after another."""
    files: dict[str, str] = {}
    for path, code in _FILE_BLOCK.findall(GUIDE.read_text(encoding="utf-8")):
        files[path] = files[path] + "\n\n" + code if path in files else code
    return files


async def run(*args: str, env: dict[str, str], cwd: Path) -> str:
    out, err, code = await getProcessOutputAndValue(sys.executable, args, env=env, path=str(cwd))
    assert code == 0, (out + err).decode()
    return out.decode()


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location("guide_" + path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_guide_documents_every_public_name_of_the_adapter_and_testing_modules():
    import ambassador.adapter
    import ambassador.testing

    reference = GUIDE.read_text(encoding="utf-8").split("## Reference: the public names", 1)[1]
    named = set(re.findall(r"`([A-Za-z_0-9]+)", reference))
    assert set(ambassador.adapter.__all__) - named == set()
    assert set(ambassador.testing.__all__) - named == set()


def test_guide_shows_every_file_of_its_layout():
    assert set(guide_files()) == {
        "ambassador-weather/setup.py",
        "ambassador-weather/pyproject.toml",
        "ambassador-weather/ambassador_weather/__init__.py",
        "ambassador-weather/ambassador_weather/testing.py",
        "ambassador-weather/twisted/plugins/ambassador_weather.py",
        "ambassador-weather/tests/test_weather.py",
    }


@pytest_twisted.ensureDeferred
async def test_following_the_guide_gives_an_installed_tested_serving_adapter(tmp_path):
    for path, code in guide_files().items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(code, encoding="utf-8")
    assert not (tmp_path / "ambassador-weather/twisted/plugins/__init__.py").exists()

    # The guide's `pip install ./ambassador-weather`, into a directory of its own so that this
    # test leaves the environment the other tests run in as it found it.
    site = tmp_path / "site"
    await run("-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), "./ambassador-weather",
              env=dict(os.environ), cwd=tmp_path)
    env = {"PYTHONPATH": str(site)}

    # `pytest ambassador-weather/tests`
    output = await run("-m", "pytest", "-q", "-p", "no:cacheprovider", "ambassador-weather/tests",
                       env={**BASE_ENV, **env}, cwd=tmp_path)
    assert "3 passed" in output

    # `twistd ambassador --list-adapters`
    listing, code = await run_twistd("ambassador", "--list-adapters", env=env, cwd=tmp_path)
    assert code == 0
    assert "weather: Acme Weather forecasts" in listing and "mounted at: /weather (forecast)" in listing

    # `WEATHER_API_KEY=<key> twistd -n ambassador`, in front of the guide's fake Acme Weather
    fake = load_module(site / "ambassador_weather" / "testing.py").FakeWeather()
    port = serve(fake)
    process = spawn_ambassador("--port", "0", "--admin-port", "none", cwd=tmp_path, env={
        **env, "WEATHER_API_KEY": "test-weather-key", "WEATHER_BASE_URL": port.base_url})
    try:
        url = f"http://127.0.0.1:{await process.listening}"
        response, body = await get(url + "/weather?city=Berlin&days=2")
    finally:
        process.transport.signalProcess(signal.SIGTERM)
        await port.stopListening()
    assert response.code == 200
    assert [day["date"] for day in json.loads(body)["days"]] == ["2026-11-27", "2026-11-28"]
    assert fake.requests[0].headers["x-api-key"] == "test-weather-key"
    assert await process.ended == (0, None)
    assert "test-weather-key" not in process.output.decode()
