"""Secret files: read, stripped, re-read on a kubelet-style symlink swap, last good value kept."""

import os

import pytest
from twisted.internet.task import Clock

from ambassador.credentials.sources import (FILE_POLL_INTERVAL, MAX_SECRET_FILE_BYTES, Credential, FileSecret,
                                           as_query_parameter, secret_from_environment)
from ambassador.exchange import UpstreamRequest
from ambassador.interfaces import ConfigurationError


def kubelet_secret_volume(root, files: dict[str, str], generation: str) -> None:
    """Write ``files`` the way the kubelet updates a Secret volume: a new timestamped
    directory, a ``..data_tmp`` symlink to it renamed over ``..data`` atomically, and
    each visible file a symlink through ``..data``."""
    directory = root / generation
    directory.mkdir()
    for name, value in files.items():
        (directory / name).write_text(value)
    os.symlink(generation, root / "..data_tmp")
    os.replace(root / "..data_tmp", root / "..data")
    for name in files:
        if not (root / name).is_symlink():
            os.symlink(f"..data/{name}", root / name)


def test_rotation_by_symlink_swap_takes_effect_within_the_poll_interval(tmp_path):
    kubelet_secret_volume(tmp_path, {"apikey": "old-value\n"}, "..2026_11_26_09_00_00.1")
    secret = FileSecret(str(tmp_path / "apikey"))
    clock = Clock()
    secret.start(clock)
    assert secret.current() == "old-value"

    kubelet_secret_volume(tmp_path, {"apikey": "new-value\n"}, "..2026_11_26_09_05_00.2")
    assert secret.current() == "old-value"  # not re-read until the next poll
    clock.advance(FILE_POLL_INTERVAL)
    assert secret.current() == "new-value"
    assert FILE_POLL_INTERVAL <= 2  # the promise in the README: rotation within 2 s
    secret.stop()


def test_request_built_before_rotation_keeps_its_credential(tmp_path):
    (tmp_path / "key").write_text("first")
    credential = Credential(FileSecret(str(tmp_path / "key")), as_query_parameter("api_key"), "hint")
    clock = Clock()
    credential.start(clock)
    in_flight = credential.attach(UpstreamRequest("GET", "/x"), "test").result
    (tmp_path / "key").write_text("second-longer")
    clock.advance(FILE_POLL_INTERVAL)
    assert in_flight.query == (("api_key", "first"),)
    assert credential.attach(UpstreamRequest("GET", "/x"), "test").result.query == (("api_key", "second-longer"),)
    credential.stop()


def damage_file(path, damage: str) -> None:
    """Turn ``path`` into something no secret file should be."""
    path.unlink()
    if damage == "empty":
        path.write_text("  \n")
    elif damage == "not-utf-8":
        path.write_bytes(b"\xff\xfe\x00secret")
    elif damage == "fifo":
        os.mkfifo(path)  # open() would block the reactor until a writer came
    elif damage == "directory":
        path.mkdir()
    elif damage == "huge":
        path.write_text("a" * (MAX_SECRET_FILE_BYTES + 1))
    elif damage == "two-lines":
        path.write_text("one\ntwo\n")
    elif damage == "dangling-symlink":
        os.symlink(path.parent / "nowhere", path)


DAMAGE = ["remove", "empty", "not-utf-8", "fifo", "directory", "huge", "two-lines", "dangling-symlink"]


@pytest.mark.parametrize("damage", DAMAGE)
def test_any_damage_keeps_the_last_good_value_warns_once_and_the_poll_recovers(tmp_path, log_events, damage):
    path = tmp_path / "key"
    path.write_text("good-value")
    secret = FileSecret(str(path))
    clock = Clock()
    secret.start(clock)
    damage_file(path, damage)
    clock.advance(FILE_POLL_INTERVAL)
    clock.advance(FILE_POLL_INTERVAL)
    assert secret.current() == "good-value" and secret.problem
    warnings = [e for e in log_events if e.get("path") == str(path) and e["log_level"].name == "warn"]
    assert len(warnings) == 1  # once, not every poll
    assert "keeping the last good value" in warnings[0]["kept"]
    if path.is_dir() and not path.is_symlink():
        path.rmdir()
    elif path.is_symlink() or path.exists():
        path.unlink()
    path.write_text("back-again")
    clock.advance(FILE_POLL_INTERVAL)
    assert secret.current() == "back-again" and secret.problem is None  # the poll survived
    secret.stop()


@pytest.mark.parametrize("damage", DAMAGE[1:])
def test_a_damaged_file_at_start_has_no_value_and_a_problem_naming_what_is_wrong(tmp_path, damage):
    path = tmp_path / "key"
    path.write_text("x")
    damage_file(path, damage)
    secret = FileSecret(str(path))  # returns at once, FIFO or not
    assert secret.current() is None
    assert secret.problem and "good-value" not in secret.problem and "secret" not in secret.problem


def test_literal_and_file_together_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="both TMDB_API_KEY and TMDB_API_KEY_FILE"):
        secret_from_environment({"TMDB_API_KEY": "x", "TMDB_API_KEY_FILE": "/y"}, "TMDB_API_KEY")


def test_secrets_do_not_show_in_reprs(tmp_path):
    (tmp_path / "key").write_text("file-api-key")
    credential = Credential(FileSecret(str(tmp_path / "key")), as_query_parameter("api_key"), "hint")
    literal = secret_from_environment({"TMDB_API_KEY": "test-api-key"}, "TMDB_API_KEY")
    assert "file-api-key" not in repr(credential) and "test-api-key" not in repr(literal)


def test_basic_password_from_a_secret_volume_rotates_and_is_redacted(tmp_path):
    from ambassador.credentials.sources import BasicPair, PlainValue, as_basic

    kubelet_secret_volume(tmp_path, {"password": "basic-password"}, "..2026_11_26_09_00_00.1")
    credential = Credential(BasicPair(PlainValue("username", "reader"), FileSecret(str(tmp_path / "password"))),
                            as_basic(), "hint")
    clock = Clock()
    credential.start(clock, None)
    sent = credential.attach(UpstreamRequest("GET", "/x"), "test").result
    assert sent.headers == {"Authorization": "Basic cmVhZGVyOmJhc2ljLXBhc3N3b3Jk"}  # reader:basic-password
    assert credential.redact("x cmVhZGVyOmJhc2ljLXBhc3N3b3Jk basic-password reader") == "x [REDACTED] [REDACTED] reader"
    kubelet_secret_volume(tmp_path, {"password": "rotated"}, "..2026_11_26_09_05_00.2")
    clock.advance(FILE_POLL_INTERVAL)
    assert credential.attach(UpstreamRequest("GET", "/x"), "test").result.headers["Authorization"] == "Basic cmVhZGVyOnJvdGF0ZWQ="
    assert credential.reloads() == 1
    os.unlink(tmp_path / "..data")
    clock.advance(FILE_POLL_INTERVAL)
    assert credential.present() and "last good value" in credential.warning()
    credential.stop()
