"""The generic ``http`` adapter: one outside HTTP API mounted at a path, configured from the config file alone.

``/name/<rest>`` is forwarded to ``<base URL>/<rest>`` with the caller's query
(credential parameters removed) and the configured credential. Only the
configured methods and path prefixes are forwarded; the web layer has already
checked every path segment.
"""

from __future__ import annotations

from typing import ClassVar

from attrs import frozen
from zope.interface import implementer

from ambassador.adapter import (
    DEFAULT_MAX_RESPONSE_BYTES,
    Egress,
    Answer,
    ICredential,
    IExternalAdapter,
    InboundRequest,
    Route,
    UpstreamRequest,
    UpstreamResponse,
    credential_rejected,
    forward,
    not_found,
    outside_failure,
    without_params,
)

#: Caller headers sent upstream: what describes the body and the answer wanted. No
#: Authorization, no Cookie, nothing conditional (a 304 cannot be checked).
FORWARDED_REQUEST_HEADERS = frozenset({"accept", "accept-language", "content-type"})


@implementer(IExternalAdapter)
@frozen
class HTTPAdapter:
    name: str
    mount: str
    base_url: str  # scheme://host[:port]
    credential: ICredential
    base_path: str = ""  # the base URL's path, without a trailing slash
    methods: tuple[str, ...] = ("GET", "HEAD")
    paths: tuple[str, ...] = ()  # allowed path prefixes below the base path, no trailing slash; () allows all
    secret_params: frozenset[str] = frozenset()
    probe_path: str | None = None
    #: (key, value) pairs of ambassador.pipeline.resilience.Policy from the config file (timeout, retries …).
    policy_defaults: tuple[tuple[str, str], ...] = ()
    propagate_trace: bool = False  # send traceparent upstream (config file's propagate_trace)
    #: How its requests leave (proxy, trust, client certificate); None: the process's defaults.
    egress: Egress | None = None
    accept_encoding: str = "identity"  # or gzip: asked of the upstream, decoded before interpret
    max_response_bytes: ClassVar[int] = DEFAULT_MAX_RESPONSE_BYTES

    @property
    def routes(self) -> tuple[Route, ...]:
        return (Route(self.name, self.mount, prefix=True, methods=self.methods),)

    def upstream_request(self, inbound: InboundRequest) -> UpstreamRequest:
        path = "/" + "/".join(inbound.segments)
        if self.paths and not any(path == p or path.startswith(p + "/") for p in self.paths):
            allowed = ", ".join(self.mount + p for p in self.paths)
            raise not_found(f"{self.mount} forwards only paths at or below {allowed}.")
        return UpstreamRequest(
            inbound.method,
            self.base_path + path if inbound.segments else self.base_path or "/",
            without_params(inbound.query, self.secret_params),
            {name: value for name, value in inbound.headers.items() if name in FORWARDED_REQUEST_HEADERS},
            inbound.body or None,
        )

    def interpret(self, inbound: InboundRequest, response: UpstreamResponse) -> Answer:
        failure = outside_failure(self.name, response)
        if failure is not None:
            raise failure
        if response.status == 401:
            raise credential_rejected(self.name)
        return forward(response)
