"""Helpers adapters use to turn an upstream response into an answer for the caller."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping

from ambassador.exchange import Answer, UpstreamResponse
from ambassador.problems import Problem

#: Response headers passed back to the caller by default: what describes the
#: body and its freshness. Everything else (Set-Cookie, Server, hop-by-hop,
#: rate-limit internals) stays with the ambassador.
PASSED_RESPONSE_HEADERS = frozenset(
    {"content-type", "content-language", "cache-control", "etag", "last-modified", "expires", "vary"}
)

#: Hop-by-hop headers (RFC 9110 section 7.6.1, and the older ones proxies still
#: meet): they describe one connection and are never passed on, in either direction.
HOP_BY_HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
)

_JSON_OPENERS = {ord("{"): ord("}"), ord("["): ord("]")}
# A control character other than tab (RFC 9110 section 5.5): a header value holding one is not passed on.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def hop_by_hop(headers: Mapping[str, str]) -> frozenset[str]:
    """The hop-by-hop header names of a message (lower-case names): the standard ones and those
    its ``Connection`` header names."""
    named = headers.get("connection", "").lower().split(",")
    return HOP_BY_HOP_HEADERS | {name.strip() for name in named if name.strip()}


def forward(response: UpstreamResponse, header_names: frozenset[str] = PASSED_RESPONSE_HEADERS) -> Answer:
    """The upstream status and body, unchanged, with only ``header_names`` (lower-case) passed on.

    Hop-by-hop headers are never passed, even when an adapter names them (an
    adapter opts in to ``set-cookie`` the same way: by naming it), and neither is a value
    holding a control character (Twisted would pass all but CR and LF on to the caller).
    """
    passed = _passed(frozenset(header_names), response.headers.get("connection", ""))  # no copy of a frozenset
    headers = [(name, value) for name, value in response.headers.items()
               if name in passed and not _CONTROL.search(value)]
    return Answer(response.status, headers, response.body)


@functools.lru_cache(maxsize=32)
def _passed(header_names: frozenset[str], connection: str) -> frozenset[str]:
    """``header_names`` without the hop-by-hop ones of an answer whose Connection header is ``connection``:
    the same few pairs for every answer (``keep-alive``), so remembered rather than worked out each time."""
    return header_names - hop_by_hop({"connection": connection})


def is_json_type(response: UpstreamResponse) -> bool:
    media_type = response.content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


def looks_like_json(body: bytes) -> bool:
    """A cheap structural check for a JSON document (object or array).

    Success bodies are checked this way instead of parsed: parsing every
    12 KB page would cost more than the rest of the proxy path. A body cut
    short in transit is caught by the HTTP client's length check instead.
    """
    stripped = body.strip()
    return bool(stripped) and _JSON_OPENERS.get(stripped[0]) == stripped[-1]


def parse_json_object(response: UpstreamResponse) -> dict | None:
    """The body as a JSON object, or None when it is not one."""
    try:
        document = json.loads(response.body)
    except (ValueError, UnicodeDecodeError):
        return None
    return document if isinstance(document, dict) else None


def bad_answer(service: str, what: str) -> Problem:
    return Problem(
        502,
        "upstream-bad-answer",
        "Upstream answered something unexpected",
        f"The {service} service answered {what}; the ambassador does not pass that on.",
    )


def retry_after(response: UpstreamResponse, default: str | None = None) -> list[tuple[str, str]]:
    """The upstream ``Retry-After`` header (or ``default``) as headers for a Problem."""
    value = response.headers.get("retry-after", default)
    return [("Retry-After", value)] if value is not None else []


def outside_failure(service: str, response: UpstreamResponse) -> Problem | None:
    """The problem for an answer that means the outside world failed, or None.

    429 and 5xx belong to the outside service, not to the caller: they become
    problems with the matching gateway status, keeping ``Retry-After``.
    A redirect is not followed or passed on (its Location may carry a credential).
    """
    status = response.status
    if status == 429:
        return Problem(429, "upstream-rate-limited", "Upstream rate limit reached",
                       f"The {service} service is refusing requests because its rate limit was reached; "
                       "retry later.", headers=retry_after(response))
    if status == 503:
        return Problem(503, "upstream-unavailable", "Upstream unavailable",
                       f"The {service} service answered 503 (temporarily unavailable).",
                       headers=retry_after(response))
    if status == 504:
        return Problem(504, "upstream-timeout", "Upstream timed out",
                       f"The {service} service answered 504 (its own gateway timed out).")
    if status >= 500:
        return Problem(502, "upstream-error", "Upstream error", f"The {service} service failed with status {status}.")
    if 300 <= status < 400 or status < 200:
        return bad_answer(service, f"status {status}")
    return None
