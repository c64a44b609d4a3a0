"""The log observers write what Twisted's would, formatted once per format instead of per event."""

import json
from datetime import datetime, timezone

import pytest
import pytest_twisted
from twisted.logger import Logger, formatEvent, formatEventAsClassicLogText

from ambassador.logs import event_as_json, event_as_text, format_event


def emitted(text, /, **fields):
    events = []
    Logger(namespace="ambassador.access", observer=events.append).info(text, **fields)
    return events[0]


@pytest.mark.parametrize("text, fields", [
    ("{method} {path} {status} {duration_ms}ms route={route} id={request_id}",
     dict(method="GET", path="/movies?api_key=[REDACTED]", status=200, duration_ms=3.7, route=None, request_id="r")),
    ("{name!r} {count:>5} {ratio:.2f} {{literal}} {text!s}", dict(name="tmdb", count=7, ratio=0.5, text=b"x")),
    ("{a.b} {c()}", dict(a=None, c=lambda: "called")),  # more than names: Twisted's own formatting
    ("missing {nope}", {}),
    ("no fields at all", {}),
    ("line one\nline two {x}", dict(x=1)),
    ("quotes ' \" and a \\ backslash {a!r:^10} {b:,} {c!a}", dict(a="x", b=12345, c="\u00e9")),
    ("{a:{width}}", dict(a=1, width=5)),  # a nested spec: Twisted's own formatting
])
def test_text_is_what_twisted_writes(text, fields):
    event = emitted(text, **fields)
    assert format_event(event) == formatEvent(event)
    assert event_as_text(event) == formatEventAsClassicLogText(event)


def test_json_time_is_utc_with_milliseconds():
    event = emitted("x {y}", y=1)
    document = json.loads(event_as_json(event))
    expected = datetime.fromtimestamp(event["log_time"], timezone.utc).isoformat(timespec="milliseconds")
    assert document["time"] == expected
    assert (document["message"], document["y"]) == ("x 1", 1)


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
    writer = _LineWriter(stream)
    lines = [f"line {i} " + "x" * 100 + "\n" for i in range(60)]
    for line in lines:
        writer.write(line)
    await deferLater(reactor, 0, lambda: None)
    assert stream.getvalue() == "".join(lines)
    assert all(len(w) <= _PIPE_BUF and w.endswith("\n") for w in stream.writes)
    assert len(stream.writes) < len(lines) / 10
