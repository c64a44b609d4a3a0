"""Adapters as plugins: --list-adapters, --adapter, --mount, plugin directories, broken and read-only dropins."""

import json
import os
import signal
import textwrap

import pytest
import pytest_twisted
from twisted.python import usage

from ambassador.app.service import Options
from ambassador.testing import serving, start_ambassador
from conftest import get, tmdb_env
from processes import run_twistd, spawn_ambassador

# A second adapter for a plugin directory: TMDB's discover route again, at /films.
FILMS_DROPIN = textwrap.dedent('''
    from attrs import evolve
    from twisted.plugin import IPlugin
    from zope.interface import implementer

    from ambassador.adapters.tmdb import MOVIES, TMDBPlugin
    from ambassador.adapter import IAdapterPlugin

    FILMS = evolve(MOVIES, path="/films")


    @implementer(IPlugin, IAdapterPlugin)
    class FilmsPlugin:
        name = "films"
        description = "TMDB discover again, at /films"
        settings = ()
        routes = (FILMS,)

        def configure(self, environ, reactor):
            return evolve(TMDBPlugin().configure(environ, reactor), name="films", routes=(FILMS,))


    films = FilmsPlugin()
''')
BROKEN_DROPIN = "import not_installed_dependency\n"


def plugin_dir(tmp_path, **dropins: str):
    directory = tmp_path / "plugins"
    directory.mkdir()
    for name, source in dropins.items():
        (directory / f"{name}.py").write_text(source)
    return directory


async def serve_and_stop(args, env, cwd, paths):
    """Start twistd with ``args``, GET each of ``paths``; returns the statuses and everything it printed."""
    process = spawn_ambassador("--port", "0", "--admin-port", "none", *args, env=env, cwd=cwd)
    try:
        port = await process.listening
        statuses = [(await get(f"http://127.0.0.1:{port}{path}"))[0].code for path in paths]
    finally:
        process.transport.signalProcess(signal.SIGTERM)
    assert await process.ended == (0, None)
    return statuses, process.output.decode()


@pytest_twisted.ensureDeferred
async def test_list_adapters_shows_routes_and_which_settings_are_set_never_values(tmp_path):
    env = {"TMDB_API_KEY": "test-api-key", "TMDB_BASE_URL": "http://tmdb.internal:8000"}
    output, code = await run_twistd("ambassador", "--list-adapters", "--mount", "tmdb.movies=/films",
                                    env=env, cwd=tmp_path)
    assert code == 0
    assert "tmdb: The Movie Database" in output
    assert "mounted at: /tmdb/… (tmdb-v3), /films (movies)" in output
    settings = {line.split()[0]: line.split()[1] for line in output.splitlines() if line.startswith("  TMDB_")}
    assert settings == {"TMDB_READ_ACCESS_TOKEN": "not", "TMDB_READ_ACCESS_TOKEN_FILE": "not",
                        "TMDB_API_KEY": "set", "TMDB_API_KEY_FILE": "not", "TMDB_BASE_URL": "set"}
    assert "test-api-key" not in output and "tmdb.internal" not in output
    assert "listening" not in output


@pytest_twisted.ensureDeferred
async def test_list_adapters_with_a_config_file_shows_what_the_file_serves(tmp_path):
    config = tmp_path / "ambassador.yaml"
    config.write_text("adapters:\n"
                      "  films:\n    type: tmdb\n    base_url: http://tmdb.internal:8000\n"
                      "  weather:\n    mount: /weather\n    base_url: http://weather.internal\n"
                      "    credential: {style: query, secret: {env: WEATHER_KEY}}\n")
    env = {"TMDB_API_KEY": "test-api-key"}
    output, code = await run_twistd("ambassador", "--config", str(config), "--list-adapters",
                                    "--mount", "films.movies=/films", env=env, cwd=tmp_path)
    assert code == 0, output
    lines = output.splitlines()
    assert lines[:7] == [
        f"Served from {config}:",
        "films: The Movie Database v3 API: /movies (discover) and /tmdb/3/… passthrough",
        "  mounted at: /tmdb/… (tmdb-v3), /films (movies)",
        "  credential: set",
        "weather: an HTTP API (type http)",
        "  mounted at: /weather/… (weather)",
        lines[6],
    ]
    assert lines[6].startswith("  credential: missing: ") and "WEATHER_KEY" in lines[6]
    assert "Found but not in" in output and "tmdb" in output.split("Found but not in")[1]
    assert "test-api-key" not in output and "internal" not in output

    config.write_text("adapters:\n  films:\n    type: nonesuch\n")
    output, code = await run_twistd("ambassador", "--config", str(config), "--list-adapters", env=env, cwd=tmp_path)
    assert code != 0 and f"{config}: adapters.films.type: expected http or an adapter plugin" in output
    assert "Traceback" not in output


@pytest_twisted.ensureDeferred
async def test_an_installed_distribution_is_listed_and_serves_under_twistd(tmp_path):
    """plugins/ambassador-omdb installed next to the ambassador (./run-tests does) is found with no change to
    the core: its dropin in site-packages/twisted/plugins is all twistd needs."""
    from ambassador_omdb.testing import FakeOMDb

    key = "test-omdb-key"
    with serving(FakeOMDb()) as fake:
        env = {"OMDB_BASE_URL": fake.base_url, "OMDB_API_KEY": key}
        listing, code = await run_twistd("ambassador", "--list-adapters", env=env, cwd=tmp_path)
        assert code == 0
        assert [line for line in listing.splitlines() if line.startswith("omdb: ")]
        assert "mounted at: /omdb (omdb)" in listing
        assert [line.split()[:2] for line in listing.splitlines() if "OMDB_" in line] == [
            ["OMDB_API_KEY", "set"], ["OMDB_API_KEY_FILE", "not"], ["OMDB_BASE_URL", "set"]]
        assert key not in listing and fake.base_url not in listing

        process = spawn_ambassador("--port", "0", "--admin-port", "none", "--adapter", "omdb", env=env, cwd=tmp_path)
        try:
            port = await process.listening
            response, body = await get(f"http://127.0.0.1:{port}/omdb?i=tt0133093")
            assert response.code == 200 and json.loads(body)["Title"] == "The Matrix"
            response, _ = await get(f"http://127.0.0.1:{port}/movies")
            assert response.code == 404  # only the adapter named with --adapter is served
        finally:
            process.transport.signalProcess(signal.SIGTERM)
        assert await process.ended == (0, None)
    assert key not in process.output.decode()


@pytest_twisted.ensureDeferred
async def test_unknown_adapter_is_a_startup_error_listing_the_known_ones(tmp_path):
    output, code = await run_twistd("-n", "ambassador", "--adapter", "nope", env={}, cwd=tmp_path)
    assert code == 1
    assert "--adapter: not the name of a known adapter; known adapters: " in output and "tmdb" in output
    assert "nope" not in output  # what was typed is never repeated: it may be a pasted secret
    assert "Traceback" not in output


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(["--adapter", "tmdb", *args])
    return options


@pytest_twisted.ensureDeferred
async def test_mount_moves_the_main_route_or_a_named_one(fake_tmdb, monkeypatch):
    for name, value in tmdb_env(fake_tmdb, TMDB_API_KEY="test-api-key").items():
        monkeypatch.setenv(name, value)
    options = parse("--mount", "tmdb=/themoviedb", "--mount", "tmdb.movies=/v1/films/")
    ambassador = start_ambassador(options.settings.adapters)
    try:
        statuses = [(await get(ambassador.url + path))[0].code
                    for path in ["/themoviedb/3/movie/550", "/v1/films", "/tmdb/3/movie/550", "/movies"]]
    finally:
        await ambassador.service.stopService()
    assert statuses == [200, 200, 404, 404]
    assert [r.path for r in fake_tmdb.requests] == ["/3/movie/550", "/3/discover/movie"]


def test_forward_request_id_for_an_adapter_not_served_is_a_usage_error_that_does_not_repeat_it(monkeypatch):
    monkeypatch.setenv("TMDB_API_KEY", "test-api-key")
    with pytest.raises(usage.UsageError) as error:
        parse("--forward-request-id", "test-pasted-value")
    assert str(error.value) == "--forward-request-id must name an adapter that is served (--list-adapters lists them)"


@pytest.mark.parametrize("name, expected", [
    *[(name, "a number of seconds") for name in
      ("timeout", "connect-timeout", "probe-interval", "idle-timeout", "read-timeout", "grace-period")],
    ("max-connections", "a whole number"),
    ("workers", "a whole number"),
])
def test_a_number_option_given_something_else_names_the_option_never_the_value(name, expected):
    with pytest.raises(usage.UsageError) as error:
        Options().parseOptions([f"--{name}", "test-pasted-value"])
    assert str(error.value) == f"Parameter type enforcement failed: --{name} must be {expected}"


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--mount", "tmdb=/movies", "tmdb (movies) and tmdb (tmdb-v3) are both mounted at /movies"),
        ("--mount", "tmdb.movies=/tmdb/3/films", "tmdb (movies) at /tmdb/3/films and tmdb (tmdb-v3) at /tmdb overlap"),
        ("--mount", "tmdb.pasted-secret=/x", "--mount: tmdb has no route of the name given; its routes: tmdb-v3, movies"),
        ("--mount", "pasted-secret=/x", "--mount: names an adapter that is not served; served: tmdb"),
        ("--mount", "tmdb=/x/../y", "expected NAME=/path or NAME.ROUTE=/path"),
        ("--mount", "tmdb=x", "expected NAME=/path or NAME.ROUTE=/path"),
        ("--mount", "tmdb=/", "expected NAME=/path or NAME.ROUTE=/path"),
        ("--mount", "tmdb=/a%2fb", "expected NAME=/path or NAME.ROUTE=/path"),
        ("--policy", "tmdb.retries=pasted-secret", "--policy: retries must be"),
        ("--policy", "pasted-secret.retries=1",
         "--policy: ADAPTER.KEY=VALUE names an adapter that is not served; served: tmdb"),
        ("--policy", "pasted-secret", "--policy: expected KEY=VALUE or ADAPTER.KEY=VALUE"),
        ("--policy", "tmdb.pasted-secret=1", "unknown policy key; known: "),
    ],
)
def test_bad_mounts_and_policies_name_the_setting_never_the_value(option, value, message):
    with pytest.raises(usage.UsageError) as error:
        parse(option, value)
    assert message in str(error.value)
    assert value not in str(error.value) and "pasted-secret" not in str(error.value)  # it may be a pasted key


@pytest_twisted.ensureDeferred
async def test_plugin_dir_adds_an_adapter_and_two_on_one_path_is_a_startup_error(fake_tmdb, tmp_path):
    directory = plugin_dir(tmp_path, films=FILMS_DROPIN)
    env = tmdb_env(fake_tmdb, TMDB_API_KEY="test-api-key")
    statuses, _ = await serve_and_stop(["--plugin-dir", str(directory)], env, tmp_path, ["/films", "/movies"])
    assert statuses == [200, 200]
    output, code = await run_twistd("ambassador", "--plugin-dir", str(directory), "--help", env=env, cwd=tmp_path)
    assert code == 0 and "films: TMDB discover again, at /films" in output

    output, code = await run_twistd("-n", "ambassador", "--plugin-dir", str(directory), "--mount", "films=/movies",
                                    env=env, cwd=tmp_path)
    assert code == 1
    assert "tmdb (movies) and films (movies) are both mounted at /movies" in output
    assert "Traceback" not in output


@pytest_twisted.ensureDeferred
async def test_broken_dropin_is_reported_once_and_the_others_serve(fake_tmdb, tmp_path):
    directory = plugin_dir(tmp_path, films=FILMS_DROPIN, weather=BROKEN_DROPIN)
    env = tmdb_env(fake_tmdb, TMDB_API_KEY="test-api-key", AMBASSADOR_PLUGIN_DIRS=f"{directory}{os.pathsep}")
    statuses, output = await serve_and_stop([], env, tmp_path, ["/films", "/movies"])
    assert statuses == [200, 200]
    reports = [line for line in output.splitlines() if "twisted.plugins.weather" in line]
    assert len(reports) == 1, output
    assert "failed to import (ModuleNotFoundError: No module named 'not_installed_dependency')" in reports[0]
    assert "Traceback" not in output and "Unhandled Error" not in output

    output, code = await run_twistd("-n", "ambassador", "--adapter", "weather", env=env, cwd=tmp_path)
    assert code == 1
    assert "--adapter: not the name of a known adapter" in output
    assert ("these dropins failed to import: twisted.plugins.weather (ModuleNotFoundError: "
            "No module named 'not_installed_dependency')") in output
    assert "Traceback" not in output


@pytest_twisted.ensureDeferred
async def test_unwritable_dropin_cache_is_silent(fake_tmdb, tmp_path):
    """As on a read-only filesystem or a ConfigMap volume. Root may write anywhere, so the cache's
    place is taken by a directory, which no one can replace with a file."""
    directory = plugin_dir(tmp_path, films=FILMS_DROPIN)
    (directory / "dropin.cache").mkdir()
    directory.chmod(0o555)
    try:
        for _attempt in range(2):
            statuses, output = await serve_and_stop(["--plugin-dir", str(directory)],
                                                    tmdb_env(fake_tmdb, TMDB_API_KEY="test-api-key"), tmp_path,
                                                    ["/films"])
            assert statuses == [200]
            for noise in ("dropin.cache", "unable to write", "error", "traceback"):
                assert noise not in output.lower(), output
        assert (directory / "dropin.cache").is_dir()
    finally:
        directory.chmod(0o755)


@pytest_twisted.ensureDeferred
async def test_missing_plugin_dir_is_a_startup_error(tmp_path):
    output, code = await run_twistd("-n", "ambassador", "--plugin-dir", str(tmp_path / "absent"), env={}, cwd=tmp_path)
    assert code == 1
    assert f"plugin directory {tmp_path / 'absent'} does not exist or is not a directory" in output


@pytest_twisted.ensureDeferred
async def test_cached_adapter_whose_dropin_no_longer_imports_is_reported(tmp_path):
    """dropin.cache still lists the adapter (the file looks older than the cache), but importing
    it fails now, as when a dependency was uninstalled."""
    directory = plugin_dir(tmp_path, films=FILMS_DROPIN)
    output, code = await run_twistd("ambassador", "--plugin-dir", str(directory), "--list-adapters", env={},
                                    cwd=tmp_path)
    assert code == 0 and "films: TMDB discover again" in output and (directory / "dropin.cache").is_file()
    films = directory / "films.py"
    films.write_text(BROKEN_DROPIN)
    os.utime(films, (0, 0))
    output, code = await run_twistd("ambassador", "--plugin-dir", str(directory), "--list-adapters", env={},
                                    cwd=tmp_path)
    assert code == 0
    assert "films:" not in output
    assert ("Dropin twisted.plugins.films failed to import (ModuleNotFoundError: No module named "
            "'not_installed_dependency')") in output
    assert "Traceback" not in output

