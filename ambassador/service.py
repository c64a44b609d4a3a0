"""``twistd ambassador``: command-line options and the services that serve the adapters."""

from __future__ import annotations

import ipaddress
import os
import signal

from attrs import define
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from .admin import admin_site
from .configfile import CONFIG_HELP, adapters_from_file
from .discovery import discover_adapters
from .health import Prober, Readiness
from .interfaces import ConfigurationError
from .metrics import Metrics
from .resilience import POLICY_HELP, Guard, Policy, resolve_policies
from .upstream import Gateway, UpstreamClient
from .web import AmbassadorSite, build_root

log = Logger(namespace="ambassador")


def endpoint_description(port: str, *, bare_interface: str) -> str:
    """A bare port number means TCP on ``bare_interface``; anything else is an endpoint description."""
    port = port.strip()
    if port.isdigit():
        return f"tcp:{port}:interface={bare_interface}"
    return port


class Options(usage.Options):
    synopsis = "[options]"
    optParameters = [
        ["port", "p", "8080",
         "Where to serve the main container: a bare number is TCP on 127.0.0.1 only; "
         "otherwise an endpoint description such as tcp:8080:interface=0.0.0.0 or unix:/run/amb.sock."],
        ["admin-port", None, "9901",
         "Where to serve /healthz, /readyz and /metrics: a bare number is TCP on all interfaces "
         "(the kubelet and Prometheus must reach it); an endpoint description; or 'none'."],
        ["timeout", "t", None,
         "Seconds one upstream exchange (every attempt, connect, send, whole answer) may take before the "
         "caller gets 504; shorthand for --policy timeout=SECONDS. [default: 10.0]", float],
        ["connect-timeout", None, 3.0, "Seconds to wait for a connection to an outside service.", float],
        ["probe-interval", None, 0.0,
         "Seconds between readiness probes of each adapter's upstream (adapters that name a cheap probe "
         "path, e.g. TMDB's /3/configuration); 0 turns probing off.", float],
        ["log-format", None, "text", "text (for people) or json (one JSON object per line, for log collectors)."],
        ["grace-period", None, 25.0,
         "Seconds requests in flight may take to finish after SIGTERM before the process exits "
         "(keep it below the Pod's terminationGracePeriodSeconds).", float],
        ["config", None, None,
         "YAML file configuring the adapters to serve (several at once, generic http ones included; see "
         "below). Without it every discovered adapter is configured from its environment variables."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["forward-request-id"] = set()
        self["policy"] = []

    def opt_policy(self, entry: str) -> None:
        """[ADAPTER.]KEY=VALUE: a resilience setting for every adapter, or for one (repeatable;
        the keys are listed below)."""
        self["policy"].append(entry)

    def opt_forward_request_id(self, adapter: str) -> None:
        """Send the request id upstream as X-Request-ID for this adapter (repeatable; off by default:
        the upstream is an outside service)."""
        self["forward-request-id"].add(adapter)

    def getUsage(self, width=None) -> str:
        lines = ["", "Environment variables read by the adapters (values are never printed):"]
        for plugin in discover_adapters():
            lines.append(f"  {plugin.name}: {plugin.description}")
            for setting in plugin.settings:
                lines.append(f"    {setting.name:30} {setting.help}")
        lines += ["", "Policy keys for --policy [ADAPTER.]KEY=VALUE (defaults in brackets):"]
        lines += [f"  {key:18} {text}" for key, text in POLICY_HELP.items()]
        lines += ["", CONFIG_HELP]
        return super().getUsage(width) + "\n".join(lines)

    def postOptions(self) -> None:
        from twisted.internet import reactor

        for name in ("connect-timeout", "grace-period"):
            if not self[name] > 0:
                raise usage.UsageError(f"--{name} must be a positive number of seconds")
        if self["probe-interval"] < 0:
            raise usage.UsageError("--probe-interval must be 0 (off) or a positive number of seconds")
        if self["log-format"] not in ("text", "json"):
            raise usage.UsageError("--log-format must be text or json")
        if self["log-format"] == "json" and getattr(self, "parent", None) is not None:
            if self.parent.get("logger") is None:
                self.parent["logger"] = "ambassador.logs.json_observer"
        self["endpoint"] = endpoint_description(self["port"], bare_interface="127.0.0.1")
        admin = self["admin-port"].strip()
        self["admin-endpoint"] = None if admin == "none" else endpoint_description(admin, bare_interface="0.0.0.0")
        timeout = [] if self["timeout"] is None else [f"timeout={self['timeout']}"]
        try:
            if self["config"] is not None:  # the file says which adapters; their variables fill in the rest
                self["adapters"] = adapters_from_file(self["config"], os.environ, discover_adapters(), reactor)
            else:
                self["adapters"] = [plugin.configure(os.environ, reactor) for plugin in discover_adapters()]
            self["policies"] = resolve_policies(self["adapters"], timeout + self["policy"])
        except ConfigurationError as e:
            raise usage.UsageError(str(e))
        unknown = self["forward-request-id"] - {adapter.name for adapter in self["adapters"]}
        if unknown:
            raise usage.UsageError(f"--forward-request-id: no adapter named {', '.join(sorted(unknown))}")


class Listener(Service):
    """Listens on one endpoint description; announces where once the reactor runs."""

    def __init__(self, reactor, endpoint: str, factory, label: str, *, warn_if_exposed: bool = False,
                 grace_period: float = 0.0) -> None:
        self._reactor = reactor
        self._grace_period = grace_period
        self._endpoint = endpoint
        self._factory = factory
        self._label = label
        self._warn_if_exposed = warn_if_exposed
        self.port = None
        self.setName(label)

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        listening = serverFromString(self._reactor, self._endpoint).listen(self._factory)
        listening.addCallbacks(self._listening, self._cannot_listen)

    def _listening(self, port) -> None:
        self.port = port
        # Announce once the reactor runs: then signals are handled and requests served.
        self._reactor.callWhenRunning(self._announce)

    def _announce(self) -> None:
        address = self.port.getHost()
        host = getattr(address, "host", None)
        where = f"{host}:{address.port}" if host is not None else getattr(address, "name", str(address))
        log.info("ambassador {label} listening on {address}", label=self._label, address=where)
        if self._warn_if_exposed and host is not None and not ipaddress.ip_address(host.split("%")[0]).is_loopback:
            log.warn(
                "Listening on {address}, which is not loopback: anyone who reaches this address can use "
                "the ambassador's credentials. Bind 127.0.0.1 unless the pod's network is trusted.",
                address=where,
            )

    def _cannot_listen(self, failure) -> None:
        log.critical("Cannot listen on {endpoint}: {error}", endpoint=self._endpoint, error=failure.getErrorMessage())
        raise SystemExit(1)

    def stopService(self):
        """Stop accepting, then give requests in flight up to the grace period to finish."""
        super().stopService()
        stopped = defer.maybeDeferred(self.port.stopListening) if self.port is not None else defer.succeed(None)
        drain = getattr(self._factory, "drain", None)
        if drain is not None and self._grace_period > 0:
            stopped.addCallback(lambda _: drain(self._grace_period))
        return stopped


class Upkeep(Service):
    """What the adapters need while serving: credential file polling, probes, the client pool."""

    def __init__(self, reactor, adapters, client: UpstreamClient, prober: Prober | None) -> None:
        self._reactor = reactor
        self._adapters = adapters
        self._client = client
        self._prober = prober

    def startService(self) -> None:
        super().startService()
        for adapter in self._adapters:
            adapter.credential.start(self._reactor, self._client)
        if self._prober is not None:
            self._prober.start()

    def stopService(self):
        super().stopService()
        if getattr(self._reactor, "_exitSignal", None) == signal.SIGTERM:
            # SIGTERM is how Kubernetes asks a pod to stop: a clean stop exits 0
            # (twistd would otherwise re-raise the signal and die by it).
            self._reactor._exitSignal = None
        for adapter in self._adapters:
            adapter.credential.stop()
        if self._prober is not None:
            self._prober.stop()
        return self._client.close()


@define(slots=False)
class Ambassador:
    """The assembled parts: ``service`` to run, the rest for whoever needs to look inside (tests)."""

    service: MultiService
    proxy: Listener
    admin: Listener | None
    metrics: Metrics
    readiness: Readiness


def assemble(
    reactor,
    adapters,
    *,
    endpoint: str,
    admin_endpoint: str | None,
    policies: dict[str, Policy] | None = None,
    connect_timeout: float = 3.0,
    grace_period: float = 25.0,
    probe_interval: float = 0.0,
    forward_request_id=frozenset(),
    clock=None,
) -> Ambassador:
    """Wire adapters, pipeline, proxy and admin listeners together. ``clock`` drives every timer."""
    clock = clock or reactor
    policies = policies or resolve_policies(adapters, [])
    guards = {adapter.name: Guard.of(policies[adapter.name], clock) for adapter in adapters}
    metrics = Metrics()
    readiness = Readiness.of(adapters, {name: guard.breaker for name, guard in guards.items()})
    metrics.watch(readiness)
    client = UpstreamClient(reactor, connect_timeout=connect_timeout)
    gateway = Gateway(client, clock, metrics, readiness, guards, forward_request_id=frozenset(forward_request_id))
    prober = Prober(readiness, gateway, clock, probe_interval) if probe_interval > 0 else None
    service = MultiService()
    Upkeep(clock, adapters, client, prober).setServiceParent(service)
    routes = ", ".join(f"{route.path} ({adapter.name})" for adapter in adapters for route in adapter.routes)
    log.info("Routes: {routes}", routes=routes or "none")
    site = AmbassadorSite(build_root(adapters, gateway, metrics), clock, metrics)
    proxy = Listener(reactor, endpoint, site, "proxy", warn_if_exposed=True, grace_period=grace_period)
    proxy.setServiceParent(service)
    admin = None
    if admin_endpoint is not None:
        admin = Listener(reactor, admin_endpoint, admin_site(readiness, metrics), "admin")
        admin.setServiceParent(service)
    return Ambassador(service, proxy, admin, metrics, readiness)


def makeService(options: Options) -> MultiService:
    from twisted.internet import reactor

    return assemble(
        reactor,
        options["adapters"],
        endpoint=options["endpoint"],
        admin_endpoint=options["admin-endpoint"],
        policies=options["policies"],
        connect_timeout=options["connect-timeout"],
        grace_period=options["grace-period"],
        probe_interval=options["probe-interval"],
        forward_request_id=options["forward-request-id"],
    ).service
