"""Reading and checking settings that every adapter shares."""

from __future__ import annotations

import re
from urllib.parse import SplitResult, urlsplit

from ambassador.interfaces import ConfigurationError

# A base path forwarded to: /-separated segments of the characters inbound paths may hold.
_BASE_PATH = re.compile(r"(/[A-Za-z0-9_.,:~-]+)*/?\Z")


def _split_url(value: str) -> SplitResult | None:
    """``value`` split, when it is http(s)://host[:port]… with no user info, query or fragment."""
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises ValueError for a port that is not a number
    except ValueError:
        return None
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.username is not None
        or parts.query
        or parts.fragment
    ):
        return None
    return parts


def base_url_from_environment(environ, variable: str, default: str) -> str:
    """``scheme://host[:port][/prefix]`` from ``variable``: a path prefix is kept (an egress gateway
    may serve the API below one, ``https://egress.example.com/tmdb``); no query or user info."""
    origin, path = base_url_with_path(environ.get(variable, "").strip() or default, variable)
    return origin + path


def base_url_with_path(value: str, setting: str) -> tuple[str, str]:
    """``(scheme://host[:port], /base/path)`` from ``value``; the path may be empty, never ``..``."""
    parts = _split_url(value.strip())
    if parts is None or not _BASE_PATH.match(parts.path) or {".", ".."} & set(parts.path.split("/")):
        raise ConfigurationError(
            f"{setting}: expected a URL like https://api.example.com or https://api.example.com/v2 "
            "(http or https, a host, an optional path of plain segments; no query, fragment or user info)"
        )
    return f"{parts.scheme}://{parts.netloc}", parts.path.rstrip("/")
