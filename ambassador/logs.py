"""Log observers for ``twistd ambassador``: JSON lines for log collectors (``--log-format json``)
and Twisted's classic text lines (``--log-format text``, the default), both cheap per event.

JSON: each event becomes one JSON object on stdout: ``time`` (UTC, ISO 8601),
``level``, ``logger``, ``message`` (the human text) and the event's own fields
(request_id, status, ...). Fields that are not plain JSON values are shown as
text; Twisted's internal ``log_*`` keys are left out.

Text: the lines twistd itself writes (``2026-11-26T09:17:55+0000 [ambassador.access#info] GET …``),
each ``escaped`` onto one line: a caller's CR, LF or ESC in a path or header can neither
break a line nor forge one. JSON lines escape what JSON leaves as is (DEL, C1, U+2028/9).

An event's text (``message``, the text line) is Twisted's ``formatEvent``'s with
its fields ``shown`` (no Python reprs: None is "-"): ``format_event`` gives it by
``str.format_map`` (a twelfth of the cost for the access line, one per request)
and leaves to Twisted what that cannot format (calls such as ``{c()}``, a
missing field, flattened events). This module is the one place both are done.
"""

from __future__ import annotations

import atexit
import json
import json.encoder
import os
import re
import sys
import threading
import time
from string import Formatter
from typing import Any
from datetime import datetime, UTC

from twisted.logger import ILogObserver, formatEvent
from twisted.python import threadable
from zope.interface import provider

_PLAIN = (str, int, float, bool, type(None))
_to_json = json.JSONEncoder(ensure_ascii=False, default=repr).encode
_NOT_FIELDS = frozenset({"format", "message", "time", "level", "logger"})


def format_event(event: dict) -> str:
    """The event's text, as Twisted's ``formatEvent`` gives it from the fields as ``shown``."""
    text = event.get("log_format")
    if isinstance(text, str) and "log_flattened" not in event:
        names = _names_in(text)
        if names is not None:
            try:
                if _AS_IS.issuperset(map(type, map(event.__getitem__, names))):  # the usual event, at C speed
                    return text.format_map(event)
                values = dict(zip(names, map(event.__getitem__, names)))
                for name, value in values.items():
                    if type(value) not in _AS_IS:
                        values[name] = shown(value)
                return text.format_map(values)
            except Exception:
                pass  # Twisted's formatting: calls, or its text saying why it could not
    return formatEvent(_shown_fields(event))


# The names of the fields each format string reads (one per call site: a bounded set), or None for one
# with positional fields, which only Twisted's formatting deals with.
_names_by_format: dict[str, tuple[str, ...] | None] = {}


def _names_in(text: str) -> tuple[str, ...] | None:
    try:
        return _names_by_format[text]
    except KeyError:
        pass
    if len(_names_by_format) > 1000:  # bounded all the same
        _names_by_format.clear()
    names: tuple[str, ...] | None
    try:
        fields = [field for _, field, _, _ in Formatter().parse(text) if field is not None]
        names = tuple(dict.fromkeys(re.split(r"[.\[]", field, maxsplit=1)[0] for field in fields))
        if any(not name or name.isdigit() for name in names):
            names = None
    except ValueError:  # not a format string: Twisted says so
        names = None
    _names_by_format[text] = names
    return names


_AS_IS = frozenset({str, int, float, bool})


def shown(value: Any, *, inner: bool = False) -> Any:
    """A field's value as an event's text gives it: no Python reprs. None is "-", bytes are their text,
    a list or tuple its items joined by ", " (one level), an object without a text of its own its type's name."""
    if value is None:
        return "-"
    kind = type(value)
    if kind in _AS_IS:
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, (list, tuple, set, frozenset)) and not inner:
        return ", ".join(str(shown(item, inner=True)) for item in value)
    if kind.__str__ is object.__str__ and kind.__repr__ is object.__repr__:
        return kind.__name__  # not <... object at 0x7f...>
    return value


def _shown_fields(event: dict) -> dict:
    """``event``, or a copy with the fields whose text would be a repr ``shown`` (most events have none)."""
    copy = None
    for key in _fields(event):
        value = event[key]
        if value is None or type(value) not in _AS_IS:
            if copy is None:
                copy = dict(event)
            copy[key] = shown(value)
    return event if copy is None else copy


# What a text line must not hold as is: line breaks and every other control character (C0, DEL, C1,
# the Unicode line and paragraph separators), and the backslash that starts an escape (so an escape
# in a line is always ours: a caller's literal "\n" is written "\\n").
_UNSAFE_TEXT = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\\]")
_UNSAFE_IN_TRACEBACK = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")  # its own lines stay
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape(match: re.Match) -> str:
    character = match.group()
    escape = _ESCAPES.get(character)
    if escape is None:
        code = ord(character)
        escape = f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    return escape


def escaped(text: str) -> str:
    """``text`` on one line with no control character: ``\\n``, ``\\r``, ``\\t``, ``\\\\``, ``\\x1b``, ``\\u2028``."""
    if text.isprintable() and "\\" not in text:  # the usual line, at C speed
        return text
    return _UNSAFE_TEXT.sub(_escape, text)


class PerSecond:
    """A text that depends on the time only to the second (a timestamp's prefix, a Date header),
    made by ``text_of(second)`` once a second."""

    def __init__(self, text_of) -> None:
        self._text_of = text_of
        self._second: int | None = None
        self._text = ""

    def at(self, when: float) -> str:
        second = int(when)
        if second != self._second:
            self._second, self._text = second, self._text_of(second)
        return self._text


_utc_seconds = PerSecond(lambda second: datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S"))


def _utc_time(when: float) -> str:
    milliseconds = int((when - int(when)) * 1000)
    return f"{_utc_seconds.at(when)}.{milliseconds:03d}+00:00"


# An event's fields by its keys in order: most events come from a few call sites, each always
# passing the same keys, so sorting out Twisted's log_* keys is done once per call site.
_fields_by_keys: dict[tuple, tuple] = {}


def _fields(event: dict) -> tuple:
    """The names of the event's own fields (not Twisted's ``log_*`` keys), in order."""
    keys = tuple(event)
    try:
        return _fields_by_keys[keys]
    except KeyError:
        if len(_fields_by_keys) > 1000:  # bounded all the same
            _fields_by_keys.clear()
        fields = _fields_by_keys[keys] = tuple(key for key in keys if key[:4] != "log_" and key not in _NOT_FIELDS)
        return fields


def event_as_json(event: dict) -> str:
    document = {
        "time": _utc_time(event.get("log_time", 0)),
        "level": event["log_level"].name if "log_level" in event else "info",
        "logger": event.get("log_namespace", "-"),
        "message": format_event(event),
    }
    for key in _fields(event):
        document[key] = event[key]
    failure = event.get("log_failure")
    if failure is not None:
        document["error"] = failure.getErrorMessage()
        document["traceback"] = failure.getTraceback()
    try:
        line = _to_json(document)  # a value JSON has no word for is written as its repr()
    except (TypeError, ValueError, RecursionError):  # a container holding such a value, or itself
        line = _to_json({key: value if isinstance(value, _PLAIN) else repr(value) for key, value in document.items()})
    # JSON escapes C0 controls itself; DEL, C1 and U+2028/9 are valid in a JSON string, but not in a terminal
    if line.isascii() and "\x7f" not in line:  # the usual line, at C speed
        return line
    return _UNSAFE_IN_JSON.sub(_json_escape, line)


_UNSAFE_IN_JSON = re.compile(r"[\x7f-\x9f\u2028\u2029]")


def _json_escape(match: re.Match) -> str:
    return f"\\u{ord(match.group()):04x}"


class _LineWriter:
    """Writes log events as lines on a stream, formatted and flushed once per reactor iteration
    instead of once per event.

    ``line_of`` makes an event's line (ending with a newline) or None for none. Events of one
    iteration are formatted together at its end: in a row, the formatting code stays in the CPU's
    caches (a cache hit costs 52 µs of CPU instead of 60 with its line formatted in the middle of
    the request). So an event's fields are read then: log values, not objects that change. Lines
    go out in writes of at most PIPE_BUF bytes ending at a line end (several processes writing one
    pipe, as ``--workers`` do, cannot split each other's lines). Outside the reactor thread, or
    when the reactor is not running, each event is written at once.
    """

    def __init__(self, stream, line_of) -> None:
        self._stream = stream
        self._line_of = line_of
        self._events: list = []
        self._scheduled = False
        atexit.register(self.flush)  # whatever the last iteration left

    _reactor: Any = None  # the global reactor, imported on first use; its stubs type it as a private class

    def write(self, event) -> None:
        if self._reactor is None:
            from twisted.internet import reactor as installed

            self._reactor = installed
        reactor = self._reactor
        # isInIOThread()'s own test, without its three Python calls (current_thread().ident)
        if not (reactor.running and threading.get_ident() == threadable.ioThread):
            self.flush()
            line = self._line_of(event)
            if line is not None:
                self._stream.write(line)
                self._stream.flush()
            return
        self._events.append(event)
        if len(self._events) >= _MOST_EVENTS:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            reactor.callLater(0, self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._events:
            return
        events, self._events = self._events, []
        chunk: list = []
        size = 0
        for event in events:
            line = self._line_of(event)
            if line is None:
                continue
            if chunk and size + len(line) > _PIPE_BUF:
                self._stream.write("".join(chunk))
                self._stream.flush()
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            self._stream.write("".join(chunk))
            self._stream.flush()


# Writes up to this size to a pipe are atomic (POSIX guarantees at least 512; Linux 4096).
_PIPE_BUF = 4096
_MOST_EVENTS = 256  # held for the end of an iteration at most: a bound on memory and on a line's delay


def json_observer(stream=None):
    """The observer factory twistd's ``--logger`` takes: JSON lines on ``stream`` (stdout). With
    ``--workers`` each line says which process wrote it (``"worker": 0`` is the primary)."""
    worker = os.environ.get("AMBASSADOR_WORKER", "").strip()
    extra = ', "worker": ' + worker + "}" if worker.isdigit() else None

    def line_of(event: dict) -> str:
        line = event_as_json(event)
        return (line[:-1] + extra if extra else line) + "\n"

    writer = _LineWriter(stream or sys.stdout, line_of)

    @provider(ILogObserver)
    def observe(event: dict) -> None:
        writer.write(event)

    return observe


# What twistd's own text observer writes: local time, RFC 3339 without fractions.
_local_seconds = PerSecond(lambda second: time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(second)))


def event_as_text(event: dict) -> str | None:
    """The line twistd's text observer writes for ``event`` (None for an event with nothing to say), with
    its text ``escaped`` and its fields ``shown``: one line, whatever a caller put in a path or a header.
    A failure's traceback follows on continuation lines (each starting with a tab), as twistd writes it."""
    text = escaped(format_event(event))
    failure = event.get("log_failure")
    if failure is not None:
        try:
            traceback = failure.getTraceback()
        except BaseException as e:
            traceback = f"(UNABLE TO OBTAIN TRACEBACK FROM EVENT): {e}"
        traceback = _UNSAFE_IN_TRACEBACK.sub(_escape, traceback)
        text = f"{text}\n{traceback}".replace("\n", "\n\t")
    if not text:
        return None
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{level.name if level is not None else '-'}"
    when = event.get("log_time")
    return f"{'-' if when is None else _local_seconds.at(when)} [{system}] {text}\n"


def text_observer(stream=None):
    """The observer factory twistd's ``--logger`` takes: twistd's text lines on ``stream`` (stdout)."""
    writer = _LineWriter(stream or sys.stdout, event_as_text)

    @provider(ILogObserver)
    def observe(event: dict) -> None:
        writer.write(event)

    return observe
