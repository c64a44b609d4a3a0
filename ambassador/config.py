"""Reading and checking settings that every adapter shares."""

from __future__ import annotations

from urllib.parse import urlsplit

from .interfaces import ConfigurationError


def base_url_from_environment(environ, variable: str, default: str) -> str:
    """``scheme://host[:port]`` from ``variable``: nothing else, so no request can leave it."""
    value = environ.get(variable, "").strip() or default
    try:
        parts = urlsplit(value)
        parts.port  # raises ValueError for a port that is not a number
    except ValueError:
        parts = None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.username is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        raise ConfigurationError(
            f"{variable} must look like https://host or http://host:port "
            "(no path, query or user info)"
        )
    return f"{parts.scheme}://{parts.netloc}"
