"""The values passed between the web layer, an adapter and the upstream pipeline.

The four made for every request (InboundRequest, UpstreamRequest, UpstreamResponse, Answer) are
plain ``define`` classes, not ``frozen``: a frozen class sets each field through
``object.__setattr__``, about a thousand instructions a field, some 20k per proxied request in all.
They are still treated as values: nothing changes one once it is made (``evolve`` or the
``with_*`` methods make another), and nothing hashes them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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


def without_params(query: Query, names: frozenset[str]) -> Query:
    """The query with every parameter named in ``names`` removed (case-insensitive)."""
    if not query:  # most requests have none: nothing to build
        return query
    return tuple([(k, v) for k, v in query if k.lower() not in names])
