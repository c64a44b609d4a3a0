"""The public contracts: what an adapter plugin provides and what the web layer uses.

Discovery and configuration are separate on purpose: ``IAdapterPlugin`` is
found through Twisted's plugin system and needs no credential; its
``configure`` returns the ``IExternalAdapter`` that actually serves requests.
"""

from __future__ import annotations

from attrs import frozen
from zope.interface import Attribute, Interface


@frozen
class Setting:
    """One environment variable an adapter reads; ``secret`` ones are never printed."""

    name: str
    help: str
    secret: bool = False


class IAdapterPlugin(Interface):
    """What a dropin in ``twisted/plugins/`` provides (together with ``IPlugin``)."""

    name = Attribute("Short unique name, e.g. 'tmdb'.")
    description = Attribute("One line saying which outside service this is.")
    settings = Attribute("Sequence of Setting: the environment variables it reads.")
    routes = Attribute("Sequence of ambassador.exchange.Route its adapter serves, at their default paths; "
                       "the first is the main one, which --mount NAME=/path moves. Listed without "
                       "configuring anything.")

    def configure(environ, reactor):
        """
        Build the serving adapter from ``environ`` (a mapping like ``os.environ``).

        Raise ``ConfigurationError`` for settings that cannot work (the
        process refuses to start). A missing credential is not an error
        here: the adapter is mounted and answers 503 until one appears.

        @rtype: L{IExternalAdapter}
        """


class IExternalAdapter(Interface):
    """One configured outside service: the only thing the web layer knows about it."""

    name = Attribute("The plugin's name.")
    routes = Attribute("Sequence of ambassador.exchange.Route it serves.")
    base_url = Attribute("Scheme, host, port and an optional path prefix of the outside service, e.g. "
                         "'https://api.themoviedb.org' or 'https://egress.example.com/tmdb'; request paths "
                         "are appended to it.")
    credential = Attribute("The ICredential attached to every upstream request.")
    secret_params = Attribute("Lower-case query parameter names that carry credentials: removed from "
                              "what callers send and redacted in logs.")
    policy_defaults = Attribute("Optional: (key, value) pairs of ambassador.pipeline.resilience.Policy defaults "
                                "that suit this service (e.g. its documented rate limit).")
    probe_path = Attribute("Optional: an upstream path that is cheap to GET and fails when the "
                           "credential is bad; used by --probe-interval. Absent or None: not probed.")
    max_response_bytes = Attribute("Optional: the longest upstream answer read, in bytes; a longer one is "
                                   "a 502. Absent: ambassador.pipeline.client.DEFAULT_MAX_RESPONSE_BYTES (10 MiB). "
                                   "Counted decoded when the answer is compressed.")
    propagate_trace = Attribute("Optional: True to send the W3C traceparent (and tracestate) of each attempt's span "
                                "to the outside service when tracing is on. Absent or False: the trace stops at "
                                "the ambassador (the config file's propagate_trace overrides it).")
    accept_encoding = Attribute("Optional: 'gzip' to ask the outside service for gzip answers (decoded, with "
                                "max_response_bytes as the bound, before interpret sees them), or 'identity'. "
                                "Absent: 'identity'.")

    egress = Attribute("Optional: an ambassador.adapter.Egress (forward proxy, extra CAs, client certificate) "
                       "for its upstream calls, token requests and probes. Absent or None: the process's "
                       "(HTTPS_PROXY/HTTP_PROXY/NO_PROXY, --ca-file, the system's trust store).")

    def upstream_request(inbound):
        """
        Translate an ambassador.exchange.InboundRequest into an UpstreamRequest.

        Raise ambassador.problems.Problem to answer the caller without calling out.
        """

    def interpret(inbound, response):
        """
        Turn the outside service's UpstreamResponse into the Answer for the caller.

        Raise ambassador.problems.Problem when the outside answer means the
        ambassador or the outside world failed (rejected credential, garbage).
        """


class ICredential(Interface):
    """Where an adapter's secret comes from and how it is attached (ambassador.credentials.sources).

    Optionally also ``fingerprint()``: a short digest standing for the current secret (never it),
    which keeps ambassadors with different credentials apart in a shared Redis
    (ambassador.shared.namespace). Without it, only the adapter's name and base URL do.
    """

    def attach(request, adapter):
        """
        A Deferred firing with the UpstreamRequest with the credential attached (at once, or once a
        token is fetched), or failing with a Problem when there is none.
        """

    def rejected(sent):
        """
        The upstream answered 401 to C{sent}. Return True when attaching again would send a
        fresher credential (an OAuth2 token); the gateway then retries the request once.
        """

    def present():
        """True when there is a credential to send (readiness, metrics)."""

    def missing_reason(adapter):
        """Why there is none and what to set, for a problem detail and readiness; never a value."""

    def warning():
        """Trouble that does not stop serving (a Secret file gone, its last value kept), or None."""

    def reloads():
        """How often a credential file changed and was re-read."""

    def redact(text):
        """C{text} with every secret value replaced by [REDACTED]."""

    def start(clock, client):
        """Begin upkeep: poll secret files on C{clock}; C{client} (UpstreamClient) fetches tokens."""

    def stop():
        """End upkeep."""


class ConfigurationError(Exception):
    """A setting that cannot work; the message names the setting and what was expected."""
