"""JSON-lines logging for log collectors: ``twistd ambassador --log-format json``.

Each event becomes one JSON object on stdout: ``time`` (UTC, ISO 8601),
``level``, ``logger``, ``message`` (the human text) and the event's own fields
(request_id, status, ...). Fields that are not plain JSON values are shown as
text; Twisted's internal ``log_*`` keys are left out.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone

from twisted.logger import ILogObserver, formatEvent
from zope.interface import provider

_PLAIN = (str, int, float, bool, type(None))


def event_as_json(event: dict) -> str:
    document = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), timezone.utc).isoformat(timespec="milliseconds"),
        "level": event["log_level"].name if "log_level" in event else "info",
        "logger": event.get("log_namespace", "-"),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in ("format", "message", "time", "level", "logger"):
            continue
        document[key] = value if isinstance(value, _PLAIN) else repr(value)
    failure = event.get("log_failure")
    if failure is not None:
        document["error"] = failure.getErrorMessage()
        document["traceback"] = failure.getTraceback()
    return json.dumps(document, ensure_ascii=False)


def json_observer(stream=None):
    """The observer factory twistd's ``--logger`` takes: JSON lines on ``stream`` (stdout)."""
    stream = stream or sys.stdout

    @provider(ILogObserver)
    def observe(event: dict) -> None:
        stream.write(event_as_json(event) + "\n")
        stream.flush()

    return observe
