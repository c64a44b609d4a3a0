"""How an adapter's requests leave the process: its ``Egress``, and the endpoints and agent that follow it.

An ``Egress`` says through which forward proxy (``ambassador.pipeline.proxies``),
trusting which CAs and presenting which client certificate
(``ambassador.pipeline.trust``) an adapter reaches its upstream. The
``UpstreamClient`` keeps one connection pool per distinct egress: Twisted's
pool keys a connection by (scheme, host, port) alone, so two adapters that
reach one host through different proxies or trust must not share one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from attrs import field, frozen
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate
from twisted.web.client import URI, ProxyAgent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from zope.interface import implementer

from ambassador.pipeline.proxies import ProxyEnvironment, ProxyURL
from ambassador.pipeline.trust import TrustPolicy
from ambassador.pipeline.tunnel import ProxyEndpoint, ProxyFailed, TunnelEndpoint

if TYPE_CHECKING:  # the credentials import the client, which imports this
    from ambassador.credentials.sources import SecretSource

__all__ = ["DEFAULT_EGRESS", "Egress", "EgressAgent", "Routes", "egress_of"]


@frozen
class Egress:
    """An adapter's way out. ``proxies``: None for the process's environment (``HTTPS_PROXY``, ``HTTP_PROXY``,
    ``NO_PROXY``), ``ambassador.pipeline.proxies.DIRECT`` for none, or its own; ``ca_certificates`` trusted
    besides the system store (and ``--ca-file``), or alone with ``ca_only``; ``client_cert`` and
    ``client_key``: secret sources of PEM text presented to upstreams that ask for a client certificate."""

    proxies: ProxyEnvironment | None = None
    ca_certificates: tuple[Certificate, ...] = field(default=(), eq=False)
    ca_only: bool = False
    client_cert: SecretSource | None = field(default=None, eq=False)
    client_key: SecretSource | None = field(default=None, eq=False)
    #: Equal for adapters that may share connections (the sources by where they read from); made once,
    #: since the client looks its connections up by it on every request.
    key: tuple = field(init=False, eq=False, repr=False)

    @key.default
    def _key(self) -> tuple:
        sources = tuple(source.describe() if source else None for source in (self.client_cert, self.client_key))
        return (self.proxies, tuple(c.dump() for c in self.ca_certificates), self.ca_only, sources)

    def tls_policy(self, process_ca: tuple[Certificate, ...] = ()) -> TrustPolicy:
        """The trust this egress asks for; ``process_ca`` (``--ca-file``) is added unless ``ca_only``."""
        extra = self.ca_certificates if self.ca_only else process_ca + self.ca_certificates
        return TrustPolicy(extra, only=self.ca_only, client_cert=self.client_cert, client_key=self.client_key)


DEFAULT_EGRESS = Egress()


def egress_of(adapter) -> Egress:
    """The adapter's ``egress`` attribute (optional in IExternalAdapter), else the process's defaults."""
    return getattr(adapter, "egress", None) or DEFAULT_EGRESS


class Routes:
    """The endpoint for an upstream URI: TCP to it, or to its proxy with a CONNECT tunnel for https; TLS to
    the upstream (inside the tunnel, if any) verified by ``policy`` against the upstream's name."""

    def __init__(self, reactor, clock: IReactorTime, proxies: ProxyEnvironment, policy, timeout: float) -> None:
        self._reactor, self._clock, self._proxies, self._policy = reactor, clock, proxies, policy
        self._timeout = timeout
        #: Whether any plain-http URI goes through a proxy (``proxy_for``): one is named for http.
        self.proxies_plain_http = proxies.http is not None

    def proxy_for(self, uri: URI) -> ProxyURL | None:
        return self._proxies.proxy_for(uri.scheme.decode("ascii"), uri.host.decode("ascii"), uri.port)

    def proxy_endpoint(self, proxy: ProxyURL) -> ProxyEndpoint:
        return ProxyEndpoint(self._reactor, proxy, self._timeout)

    def __call__(self, uri: URI):
        proxy = self.proxy_for(uri) if uri.scheme == b"https" else None
        endpoint: IStreamClientEndpoint
        if proxy is not None:
            endpoint = TunnelEndpoint(self.proxy_endpoint(proxy), uri.host.decode("ascii"), uri.port, self._clock,
                                      self._timeout)
        else:
            endpoint = HostnameEndpoint(self._reactor, uri.host, uri.port, timeout=self._timeout)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self._policy.creatorForNetloc(uri.host, uri.port), endpoint)
        return endpoint


@implementer(IAgent)
class EgressAgent:
    """Sends plain http through its proxy in absolute form (a ``ProxyAgent`` per proxy, over ``pool``) with
    ``Proxy-Authorization``; everything else to ``agent``, whose endpoints come from ``routes``. ``watch``
    wraps each proxy endpoint as ``agent``'s endpoints are wrapped."""

    def __init__(self, reactor, routes: Routes, agent, pool, watch) -> None:
        self._reactor, self._routes, self._agent, self._pool, self._watch = reactor, routes, agent, pool, watch
        self._through: dict[ProxyURL, ProxyAgent] = {}

    def request(self, method, uri, headers=None, bodyProducer=None) -> defer.Deferred:
        # The URI is parsed (~5 us) only when plain http may go through a proxy at all.
        proxy = None
        if self._routes.proxies_plain_http:
            parsed = URI.fromBytes(uri)
            proxy = self._routes.proxy_for(parsed) if parsed.scheme == b"http" else None
        if proxy is None:
            return self._agent.request(method, uri, headers, bodyProducer)
        if proxy.authorization is not None:
            headers = headers.copy() if headers is not None else Headers()
            headers.setRawHeaders(b"proxy-authorization", [proxy.authorization.encode("ascii")])
        if proxy not in self._through:  # one endpoint per proxy: ProxyAgent's pool key
            self._through[proxy] = ProxyAgent(self._watch(self._routes.proxy_endpoint(proxy)), self._reactor,
                                              self._pool)
        sent = self._through[proxy].request(method, uri, headers, bodyProducer)
        return sent.addCallback(_not_refused, proxy)


def _not_refused(response, proxy: ProxyURL):
    """A 407 is the proxy's answer, not the upstream's: the proxy's failure."""
    if response.code != 407:
        return response
    response.deliverBody(Protocol())  # read and dropped, so the connection can be reused
    raise ProxyFailed(f"the forward proxy {proxy.where} refused the request with status 407 (proxy "
                      "authentication required: check the proxy URL's user and password)")
