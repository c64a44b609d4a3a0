"""The values passed between the web layer, an adapter and the upstream pipeline.

The four made for every request (InboundRequest, UpstreamRequest, UpstreamResponse, Answer) are
plain ``define`` classes, not ``frozen``: a frozen class sets each field through
``object.__setattr__``, about a thousand instructions a field, some 20k per proxied request in all.
They are still treated as values: nothing changes one once it is made (``evolve`` or the
``with_*`` methods make another), and nothing hashes them.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

from attrs import define, field, frozen

Query = tuple[tuple[str, str], ...]


@frozen
class Route:
    """One inbound path an adapter serves.

    ``path`` is where it is mounted (``/movies``). A ``prefix`` route also
    serves every path below it and sees the rest as ``InboundRequest.segments``.
    ``name`` is a bounded label for logs and metrics, never a raw path.
    """

    name: str
    path: str
    prefix: bool = False
    methods: tuple[str, ...] = ("GET", "HEAD")


@define
class InboundRequest:
    """What the main container asked for, already checked by the web layer.

    ``segments`` are the path segments below the route's mount; each one is
    plain (letters, digits and ``_.,:~-``), never ``.``/``..`` and never
    percent-encoded, so an adapter can join them into an upstream path safely.
    """

    method: str
    route: Route
    segments: tuple[str, ...]
    query: Query
    headers: Mapping[str, str] = field(factory=dict)
    request_id: str = ""
    body: bytes = b""


@define
class UpstreamRequest:
    """What the pipeline sends to the outside service (before the credential is attached)."""

    method: str
    path: str
    query: Query = ()
    headers: Mapping[str, str] = field(factory=dict)
    body: bytes | None = None

    # What attrs.evolve does, without its look at the fields on every request.
    def with_query(self, query: Query) -> UpstreamRequest:
        return UpstreamRequest(self.method, self.path, query, self.headers, self.body)

    def with_headers(self, headers: Mapping[str, str]) -> UpstreamRequest:
        return UpstreamRequest(self.method, self.path, self.query, headers, self.body)


@define
class UpstreamResponse:
    """What the outside service answered: status, headers (lower-case names) and the whole body."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


@define
class Answer:
    """What the ambassador sends back to the main container."""

    status: int
    headers: Sequence[tuple[str, str]]
    body: bytes


@define
class Trace:
    """What happened to one inbound request on its way out: filled in by the
    pipeline, read by the access log."""

    upstream_status: int | None = None
    attempts: int = 0
    cache: str | None = None
    #: The inbound request's OpenTelemetry span when tracing is on (ambassador.tracing): the parent of
    #: each attempt's span, passed along here because Deferreds do not carry OTel's current context.
    span: Any = None


def without_params(query: Query, names: frozenset[str]) -> Query:
    """The query with every parameter named in ``names``, or resembling one of them, removed
    (``resembles_param``)."""
    if not query:  # most requests have none: nothing to build
        return query
    squeezed = _squeezed_names(names)
    return tuple([(k, v) for k, v in query if _squeezed(k) not in squeezed])


def resembles_param(name: str, names: frozenset[str]) -> bool:
    """Whether query parameter ``name`` is one of ``names`` or could be read as one by some server:
    compared without case, compatibility forms (fullwidth letters), or anything but letters and digits,
    so ``API_KEY ``, ``api.key``, ``api-key``, ``api_key[]`` and ``api_key[0]`` all resemble ``api_key`` (PHP, for one,
    reads ``api.key`` and ``api key`` as ``api_key``, and ``api_key[]`` as a list of it)."""
    return _squeezed(name) in _squeezed_names(names)


# A bracketed index (``[0]``, ``[]``; PHP and Rails read ``a[0]`` as an element of ``a``), and then
# anything but letters and digits.
_SQUEEZED_OUT = re.compile(r"\[[^\]]*\]|[^0-9a-z]")


def _squeezed(name: str) -> str:
    # Not remembered: the names are the caller's, and a cache of them would be memory a caller fills.
    return _SQUEEZED_OUT.sub("", (name if name.isascii() else unicodedata.normalize("NFKC", name)).casefold())


@functools.lru_cache(maxsize=64)
def _squeezed_names(names: frozenset[str]) -> frozenset[str]:
    return frozenset(map(_squeezed, names))
