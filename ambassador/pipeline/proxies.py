"""Which forward proxy an upstream URL goes through: proxy URLs and ``NO_PROXY``, read as curl reads them.

``https_proxy``/``HTTPS_PROXY`` serves https URLs, ``http_proxy``/``HTTP_PROXY``
http ones; where both spellings are set the lower-case one wins (curl's
order). ``NO_PROXY``/``no_proxy`` lists, separated by commas, what goes
direct: ``*`` (everything), host names and domains (``example.com`` and
``.example.com`` both match it and every name below it), IP addresses, CIDR
ranges (``10.0.0.0/8``), each optionally with ``:port`` (only that port).
Loopback is not implicitly direct (curl's rule, not Go's): list it.

A proxy URL is ``http://[user:password@]host[:port]`` (no scheme means
http, no port 1080 as in curl); its userinfo becomes ``Proxy-Authorization``
and is never shown: ``where`` (host:port) is what messages name.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Mapping
from urllib.parse import unquote, urlsplit

from attrs import field, frozen

from ambassador.interfaces import ConfigurationError

__all__ = ["DIRECT", "NoProxy", "ProxyEnvironment", "ProxyURL", "parse_proxy_url"]

#: The proxy port when the URL names none (curl's default).
DEFAULT_PROXY_PORT = 1080


@frozen
class ProxyURL:
    """One forward proxy: where it is, and the ``Proxy-Authorization`` value its URL's userinfo makes."""

    host: str
    port: int
    authorization: str | None = field(default=None, repr=False)

    @property
    def where(self) -> str:
        """host:port, for messages: never the credentials."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_proxy_url(value: str, setting: str) -> ProxyURL:
    """The proxy ``value`` describes; a ConfigurationError naming ``setting`` (never the value) if none."""
    expected = f"{setting}: expected a proxy URL like http://[user:password@]proxy.example:3128"
    text = value.strip()
    if "://" not in text:
        text = "http://" + text
    try:
        url = urlsplit(text)
        port = url.port
    except ValueError:
        raise ConfigurationError(expected) from None
    if url.scheme.lower() != "http":
        raise ConfigurationError(f"{setting}: expected an http:// proxy URL (the ambassador speaks to the "
                                 "proxy in plain HTTP and tunnels TLS through it)")
    if not url.hostname or url.path not in ("", "/") or url.query or url.fragment:
        raise ConfigurationError(expected)
    authorization = None
    if url.username is not None:
        pair = f"{unquote(url.username)}:{unquote(url.password or '')}".encode()
        authorization = "Basic " + base64.b64encode(pair).decode("ascii")
    return ProxyURL(url.hostname, port or DEFAULT_PROXY_PORT, authorization)


@frozen
class _Entry:
    host: str | None  # a lower-case name or domain without its leading dot
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    port: int | None

    def matches(self, host: str, address, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            return address is not None and address.version == self.network.version and address in self.network
        assert self.host is not None
        return host == self.host or host.endswith("." + self.host)


@frozen
class NoProxy:
    """The hosts a ``NO_PROXY`` value sends direct."""

    everything: bool = False
    entries: tuple[_Entry, ...] = ()

    @classmethod
    def parse(cls, value: str) -> NoProxy:
        entries = []
        for item in (part.strip().lower() for part in value.split(",")):
            if not item:
                continue
            if item == "*":
                return cls(everything=True)
            host, port = _split_port(item)
            try:
                network = ipaddress.ip_network(host.strip("[]"), strict=False)
            except ValueError:
                network = None
            name = None if network is not None else host.lstrip("*").lstrip(".")
            if network is None and not name:
                continue  # a lone "." or "*.": nothing to match, as curl ignores it
            entries.append(_Entry(name, network, port))
        return cls(entries=tuple(entries))

    def matches(self, host: str, port: int) -> bool:
        if self.everything:
            return True
        host = host.lower().strip("[]").rstrip(".")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            address = None
        return any(entry.matches(host, address, port) for entry in self.entries)


def _split_port(item: str) -> tuple[str, int | None]:
    """``host:port`` or ``[v6]:port`` apart; a bare IPv6 address or CIDR has no port."""
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if item.count(":") == 1:
        host, _, port = item.partition(":")
        if port.isdigit():
            return host, int(port)
    return item, None


@frozen
class ProxyEnvironment:
    """The proxies the environment names for http and https URLs, and what ``NO_PROXY`` sends direct."""

    https: ProxyURL | None = None
    http: ProxyURL | None = None
    no_proxy: NoProxy = NoProxy()

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> ProxyEnvironment:
        def read(name: str) -> tuple[str, str] | None:
            for spelled in (name.lower(), name):  # curl's order: lower-case first
                value = environ.get(spelled, "").strip()
                if value:
                    return spelled, value
            return None

        proxies = {}
        for scheme in ("https", "http"):
            found = read(f"{scheme.upper()}_PROXY")
            proxies[scheme] = parse_proxy_url(found[1], found[0]) if found else None
        exempt = read("NO_PROXY")
        return cls(proxies["https"], proxies["http"], NoProxy.parse(exempt[1]) if exempt else NoProxy())

    def proxy_for(self, scheme: str, host: str, port: int) -> ProxyURL | None:
        proxy = self.https if scheme == "https" else self.http
        if proxy is None or self.no_proxy.matches(host, port):
            return None
        return proxy


#: No proxy for anything.
DIRECT = ProxyEnvironment()
