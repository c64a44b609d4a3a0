"""The log observers write what Twisted's would: its text, or JSON lines with that text as the message."""

import json
from datetime import datetime, UTC

import pytest
import pytest_twisted
from twisted.logger import LogLevel, Logger, formatEvent, formatEventAsClassicLogText
from twisted.python import usage
from twisted.python.failure import Failure

from ambassador.web.limits import InboundLimits
from ambassador.logs import event_as_json, event_as_text, format_event
from ambassador.app.service import Options
from ambassador.pipeline.resilience import Policy
from conftest import get, raw_exchange, tmdb_env
from test_metrics import samples


def emitted(text, /, **fields):
    events = []
    Logger(namespace="ambassador.access", observer=events.append).info(text, **fields)
    return events[0]


@pytest.mark.parametrize("text, fields", [
    ("{method} {path} {status} {duration_ms}ms route={route} id={request_id}",
     dict(method="GET", path="/movies?api_key=[REDACTED]", status=200, duration_ms=3.7, route="movies",
          request_id="r")),
    ("{name!r} {count:>5} {ratio:.2f} {{literal}} {text!s}", dict(name="tmdb", count=7, ratio=0.5, text="x")),
    ("{c()}", dict(c=lambda: "called")),  # more than names: Twisted's own formatting
    ("missing {nope}", {}),
    ("no fields at all", {}),
    ("quotes ' \" {a!r:^10} {b:,} {c}", dict(a="x", b=12345, c="\u00e9")),
    ("{a:{width}}", dict(a=1, width=5)),  # a nested spec
    ("{0} {}", {}),  # positional fields: none in an event
    ("{a[k]} {a.real}", dict(a={"k": "v"})),  # an index, a missing attribute
    ("{x:d}", dict(x="not a number")),  # a spec the value refuses
])
def test_text_is_what_twisted_writes_for_fields_with_a_text_of_their_own(text, fields):
    event = emitted(text, **fields)
    assert format_event(event) == formatEvent(event)
    assert event_as_text(event) == formatEventAsClassicLogText(event)
    assert json.loads(event_as_json(event))["message"] == formatEvent(event)


class Plain:
    pass


@pytest.mark.parametrize("value, text", [
    (None, "-"), (b"bytes \xc3\xa9", "bytes \u00e9"), (["a", "b", None], "a, b, -"), (("x", 1), "x, 1"),
    (Plain(), "Plain"), (7, "7"), (True, "True"), ("", ""),
])
def test_text_lines_hold_no_python_reprs(value, text):
    event = emitted("v={value} end", value=value)
    assert format_event(event) == f"v={text} end"
    assert event_as_text(event).endswith(f"] v={text} end\n")
    assert json.loads(event_as_json(event))["message"] == f"v={text} end"


@pytest.mark.parametrize("value, text", [
    ("a\nb", "a\\nb"), ("a\r\nforged line", "a\\r\\nforged line"), ("\x1b[31mred", "\\x1b[31mred"),
    ("tab\there", "tab\\there"), ("nul\x00 del\x7f csi\x9b", "nul\\x00 del\\x7f csi\\x9b"),
    ("line\u2028sep\u2029", "line\\u2028sep\\u2029"), ("back\\slash", "back\\\\slash"), ("\u00e9", "\u00e9"),
])
def test_text_lines_escape_line_breaks_and_control_characters(value, text):
    event = emitted("path={path}", path=value)
    line = event_as_text(event)
    assert line.endswith(f"] path={text}\n") and line.count("\n") == 1
    assert not any(c in line[:-1] for c in "\r\x00\x1b\x7f\x9b\u2028\u2029\t")
    json_line = event_as_json(event)
    assert json.loads(json_line)["path"] == value and json.loads(json_line)["message"] == f"path={value}"
    assert not any(c in json_line for c in "\n\r\x00\x1b\x7f\x9b\u2028\u2029\t")


def failed(error: Exception, text: str, **fields) -> dict:
    """The event Logger.failure emits for ``error`` raised and caught, with its traceback."""
    try:
        raise error
    except type(error):
        failure = Failure()
    events: list = []
    Logger(namespace="ambassador", observer=events.append).failure(text, failure, **fields)
    return events[0]


def test_a_failure_keeps_its_traceback_on_continuation_lines_and_its_message_on_one():
    line = event_as_text(failed(ValueError("bad\r\nvalue\x1b"), "Failed {what}", what="a\nb"))
    first, *rest = line[:-1].split("\n")
    assert first.endswith("[ambassador#critical] Failed a\\nb")
    assert rest[0] == "\tTraceback (most recent call last):" and all(r.startswith("\t") for r in rest)
    assert rest[-3:] == ["\tbuiltins.ValueError: bad\\r", "\tvalue\\x1b", "\t"]  # its \n: a continuation


def test_json_time_is_utc_with_milliseconds():
    event = emitted("x {y}", y=1)
    document = json.loads(event_as_json(event))
    expected = datetime.fromtimestamp(event["log_time"], UTC).isoformat(timespec="milliseconds")
    assert document["time"] == expected
    assert (document["message"], document["y"]) == ("x 1", 1)


ACCESS_FORMAT = ("{method} {path} {status} {duration_ms}ms adapter={adapter} route={route} "
                 "upstream={upstream_status} attempts={attempts} cache={cache} id={request_id}")


def access_event(**fields):
    events = []
    logger = Logger(namespace="ambassador.access", observer=events.append)
    logger.info(ACCESS_FORMAT, **{
        "request_id": "5d03ede44434f09b25ca74ec61f01b01", "method": "GET", "path": "/movies?q=\u00e9\"\\",
        "status": 200, "adapter": "tmdb", "route": "movies", "upstream_status": None, "attempts": 0,
        "cache": "hit", "problem": None, "duration_ms": 12.3, **fields})
    events[0]["log_time"] = 1795707805.0429
    return events[0]


def test_access_event_as_json_line():
    assert event_as_json(access_event()) == (
        '{"time": "2026-11-26T15:43:25.042+00:00", "level": "info", "logger": "ambassador.access", '
        '"message": "GET /movies?q=\u00e9\\"\\\\ 200 12.3ms adapter=tmdb route=movies upstream=- attempts=0 '
        'cache=hit id=5d03ede44434f09b25ca74ec61f01b01", "request_id": "5d03ede44434f09b25ca74ec61f01b01", '
        '"method": "GET", "path": "/movies?q=\u00e9\\"\\\\", "status": 200, "adapter": "tmdb", "route": "movies", '
        '"upstream_status": null, "attempts": 0, "cache": "hit", "problem": null, "duration_ms": 12.3}')
    assert json.loads(event_as_json(access_event(status=502, upstream_status=503, attempts=2, cache=None,
                                                 problem="upstream-error")))["upstream_status"] == 503


def test_json_fields_keep_their_order_whatever_the_keys_before():
    first = emitted("x", a=1, b=2)
    second = emitted("x", b=2, a=1)
    third = {"log_format": "x", "b": 2, "log_custom": "left out", "a": 1, "message": "left out", "c": 3}
    assert list(json.loads(event_as_json(first))) == ["time", "level", "logger", "message", "a", "b"]
    assert list(json.loads(event_as_json(second))) == ["time", "level", "logger", "message", "b", "a"]
    assert json.loads(event_as_json(third)) == {"time": "1970-01-01T00:00:00.000+00:00", "level": "info",
                                                "logger": "-", "message": "x", "b": 2, "a": 1, "c": 3}
    assert list(json.loads(event_as_json(third)))[-3:] == ["b", "a", "c"]


class Opaque:
    def __repr__(self):
        return "<opaque>"


def test_json_writes_what_it_has_no_word_for_as_its_repr():
    holds_itself, also_itself = [], {}
    holds_itself.append(holds_itself)
    also_itself["me"] = also_itself
    document = json.loads(event_as_json(emitted(
        "odd", raw=b"x", thing=Opaque(), pair=(1, "a"), inside=[b"y", {"k": Opaque()}], nan=float("nan"))))
    assert (document["raw"], document["thing"], document["pair"], document["inside"]) == (
        "b'x'", "<opaque>", [1, "a"], ["b'y'", {"k": "<opaque>"}])
    assert document["nan"] != document["nan"]
    # a container JSON cannot write at all: the whole value as its repr()
    document = json.loads(event_as_json(emitted("odd", keys={(1, 2): "tuple key"}, loop=holds_itself,
                                                also=also_itself, fine=[1])))
    assert (document["keys"], document["loop"], document["also"], document["fine"]) == (
        "{(1, 2): 'tuple key'}", "[[...]]", "{'me': {...}}", "[1]")
    assert json.loads(event_as_json(emitted("again", fine=[1], raw={1: b"z"})))["raw"] == {"1": "b'z'"}


def test_json_failure_has_error_and_traceback():
    event = failed(ValueError("no good"), "Failed {what}", what="dividing")
    document = json.loads(event_as_json(event))
    assert (document["level"], document["message"], document["what"]) == ("critical", "Failed dividing", "dividing")
    assert document["error"] == "no good"
    assert document["traceback"].startswith("Traceback") and "ValueError: no good" in document["traceback"]
    assert event_as_text(event) == formatEventAsClassicLogText(event)  # a traceback of one-line text


@pytest_twisted.ensureDeferred
async def test_lines_written_in_one_reactor_iteration_go_out_together_in_whole_lines():
    from io import StringIO

    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    from ambassador.logs import _PIPE_BUF, _LineWriter

    class Recording(StringIO):
        writes: list = []

        def write(self, text):
            self.writes.append(text)
            return super().write(text)

    stream = Recording()
    writer = _LineWriter(stream, lambda line: line)
    lines = [f"line {i} " + "x" * 100 + "\n" for i in range(60)]
    for line in lines:
        writer.write(line)
    await deferLater(reactor, 0, lambda: None)
    assert stream.getvalue() == "".join(lines)
    assert all(len(w) <= _PIPE_BUF and w.endswith("\n") for w in stream.writes)
    assert len(stream.writes) < len(lines) / 10


@pytest_twisted.ensureDeferred
async def test_events_are_formatted_at_the_end_of_the_iteration_and_at_most_so_many_are_held():
    from io import StringIO

    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    from ambassador.logs import _MOST_EVENTS, _LineWriter

    formatted = []

    def line_of(event):
        formatted.append(event["n"])
        return None if event["n"] % 2 else f"{event['n']}\n"  # odd events have no line

    stream = StringIO()
    writer = _LineWriter(stream, line_of)
    for n in range(3):
        writer.write({"n": n})
    assert formatted == [] and stream.getvalue() == ""
    await deferLater(reactor, 0, lambda: None)
    assert formatted == [0, 1, 2] and stream.getvalue() == "0\n2\n"
    for n in range(_MOST_EVENTS):
        writer.write({"n": 10 + n})
    assert len(formatted) == 3 + _MOST_EVENTS  # the bound reached: written without waiting for the iteration's end


@pytest_twisted.ensureDeferred
async def test_a_line_written_outside_the_reactor_thread_goes_out_at_once():
    from io import StringIO

    from twisted.internet import reactor
    from twisted.internet.task import deferLater
    from twisted.internet.threads import deferToThread

    from ambassador.logs import _LineWriter

    stream = StringIO()
    writer = _LineWriter(stream, lambda line: line)
    await deferToThread(writer.write, "from a thread\n")
    assert stream.getvalue() == "from a thread\n"  # no reactor turn has flushed anything yet
    writer.write("from the reactor\n")
    assert stream.getvalue() == "from a thread\n"
    await deferLater(reactor, 0, lambda: None)
    assert stream.getvalue() == "from a thread\nfrom the reactor\n"


@pytest.mark.parametrize("choice, logged", [("all", [200, 404, 431]), ("errors", [404, 431]), ("none", [])])
@pytest_twisted.ensureDeferred
async def test_access_log_says_which_answers_get_a_line_and_metrics_count_all(fake_tmdb, start_ambassador, log_events,
                                                                               choice, logged):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, TMDB_API_KEY="test-api-key"), access_log=choice)
    assert (await get(ambassador.url + "/movies"))[0].code == 200
    assert (await get(ambassador.url + "/unknown"))[0].code == 404
    too_large = b"GET /movies HTTP/1.1\r\nX-Big: " + b"a" * (InboundLimits().max_line + 1) + b"\r\n\r\n"
    assert (await raw_exchange(ambassador.url, too_large))[0] == 431  # refused before it was read whole
    assert [e["status"] for e in log_events if e.get("log_namespace") == "ambassador.access"] == logged
    counted = samples(ambassador.metrics.exposition())
    assert sum(v for (name, _), v in counted.items() if name == "ambassador_requests_total") == 3


@pytest_twisted.ensureDeferred
async def test_access_lines_of_5xx_answers_are_warnings_the_others_info(fake_tmdb, start_ambassador, log_events):
    ambassador = await start_ambassador(tmdb_env(fake_tmdb, TMDB_API_KEY="test-api-key"),
                                        policies={"tmdb": Policy(retries=0)})
    assert (await get(ambassador.url + "/movies"))[0].code == 200
    assert (await get(ambassador.url + "/unknown"))[0].code == 404
    fake_tmdb.fault = "reset"
    assert (await get(ambassador.url + "/movies?page=2"))[0].code == 502
    too_large = b"GET /movies HTTP/1.1\r\nX-Big: " + b"a" * (InboundLimits().max_line + 1) + b"\r\n\r\n"
    assert (await raw_exchange(ambassador.url, too_large))[0] == 431  # refused before it was read whole
    access = [e for e in log_events if e.get("log_namespace") == "ambassador.access"]
    assert [(e["status"], e["log_level"]) for e in access] == [
        (200, LogLevel.info), (404, LogLevel.info), (502, LogLevel.warn), (431, LogLevel.info)]
    assert json.loads(event_as_json(access[2]))["level"] == "warn"
    assert "[ambassador.access#warn] GET /movies?page=2 502 " in event_as_text(access[2])


def test_access_log_choices_are_checked():
    assert Options().parseOptions(["--access-log", "errors"]) is None
    with pytest.raises(usage.UsageError, match="--access-log must be all, errors or none"):
        Options().parseOptions(["--access-log", "some"])
