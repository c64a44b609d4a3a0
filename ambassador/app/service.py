"""``twistd ambassador``: command-line options and the services that serve the adapters."""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from typing import NoReturn

from attrs import define
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError, ReactorNotRunning
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python import usage

from ambassador.web.admin import admin_site
from ambassador.cache.responses import ENTRY_SHARE, MemoryStore, ResponseCache, SharedStore, parse_size
from ambassador.credentials.sources import FileSecret
from ambassador.app.discovery import PLUGIN_DIRS_VARIABLE, add_plugin_dirs, discover_adapters, plugin_dirs_from_environment
from ambassador.app.configfile import CONFIG_HELP
from ambassador.app.health import Health, Prober, Readiness
from ambassador.app.reload import Generation, Reloader, Wiring, load_adapters, reload_on_sighup
from ambassador.app.settings import AdapterSpec, Settings
from ambassador.interfaces import ConfigurationError
from ambassador.web.limits import InboundLimits
from ambassador.metrics import Metrics
from ambassador.app.mounting import Mount, check_mount_names, describe_adapters, describe_configured, select_adapters
from ambassador.cache.peers import PeerFactory, Peers
from ambassador.pipeline.guard import Guard
from ambassador.pipeline.resilience import POLICY_HELP, Policy
from ambassador.pipeline.stages.ratelimit import TokenBucket
from ambassador.shared.leases import Leases
from ambassador.shared.ratelimit import SharedBucket, SharedLimits
from ambassador.cache.redisstore import RedisStore, parse_redis_url
from ambassador.pipeline.client import UpstreamClient
from ambassador.pipeline.gateway import Gateway
from ambassador.web.proxy import ACCESS_LOG_FROM, ProxyFactory
from ambassador.tracing import TRACING_HELP, Tracing, tracing_wanted
from ambassador.app.workers import (PEER_DIR_VARIABLE, WORKER_VARIABLE, AdoptedEndpoint, WorkerPool, accept_one_at_a_time,
                      report_admin_port, share_of, stop_when_primary_ends, worker_index)

log = Logger(namespace="ambassador")
DEFAULT_LIMITS = InboundLimits()
CACHE_URL_VARIABLE = "AMBASSADOR_CACHE_URL"


#: Connections the kernel queues before the ambassador accepts them (nginx's default). Twisted's 50
#: drops the SYNs of a burst of callers beyond it, and each dropped one waits a second to retry.
LISTEN_BACKLOG = 511


def endpoint_description(port: str, *, bare_interface: str) -> str:
    """A bare port number means TCP on ``bare_interface``; anything else is an endpoint description."""
    port = port.strip()
    if port.isdigit():
        return f"tcp:{port}:interface={bare_interface}:backlog={LISTEN_BACKLOG}"
    return port


def _columns() -> int:
    """The terminal width for --help: $COLUMNS when it is a number (usage.Options would fail on another)."""
    text = os.environ.get("COLUMNS", "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else 80


def check_endpoint(reactor, option: str, description: str) -> None:
    """A UsageError unless ``description`` parses as an endpoint description (binding comes later:
    a port in use is reported by the Listener). Never repeats what was given."""
    try:
        serverFromString(reactor, description)
    except Exception:
        raise usage.UsageError(f"{option}: expected a port number or an endpoint description such as "
                               "tcp:8080:interface=127.0.0.1 or unix:/run/ambassador.sock") from None


def number(kind, expected: str):
    """An optParameter coerce whose error says what was expected, never what was typed
    (float's and int's own messages quote it, and twistd prints them)."""
    def coerce(text: str):
        try:
            return kind(text)
        except ValueError:
            raise ValueError(expected) from None
    return coerce


def seconds(name: str):
    return number(float, f"--{name} must be a number of seconds")


def whole(name: str):
    return number(int, f"--{name} must be a whole number")


class Options(usage.Options):
    synopsis = "[options]"
    optFlags = [
        ["no-cache", None, "Turn the response cache off for every adapter (per adapter: --policy ADAPTER.cache=off)."],
        ["list-adapters", None,
         "Print every discovered adapter (name, paths, description, the environment variables it reads "
         "and whether each is set, never its value) and exit. With --config: the adapters the file "
         "serves, their paths and whether each has its credential (the file is checked first)."],
    ]
    optParameters = [
        ["port", "p", "8080",
         "Where to serve the main container: a bare number is TCP on 127.0.0.1 only; "
         "otherwise an endpoint description such as tcp:8080:interface=0.0.0.0 or unix:/run/amb.sock."],
        ["admin-port", None, "9901",
         "Where to serve /healthz, /readyz and /metrics: a bare number is TCP on all interfaces "
         "(the kubelet and Prometheus must reach it); an endpoint description; or 'none'."],
        ["timeout", "t", None,
         "Seconds one upstream exchange (every attempt, connect, send, whole answer) may take before the "
         "caller gets 504; shorthand for --policy timeout=SECONDS. [default: 10.0]", seconds("timeout")],
        ["connect-timeout", None, 3.0, "Seconds to wait for a connection to an outside service.", seconds("connect-timeout")],
        ["probe-interval", None, 0.0,
         "Seconds between readiness probes of each adapter's upstream (adapters that name a cheap probe "
         "path, e.g. TMDB's /3/configuration); 0 turns probing off.", seconds("probe-interval")],
        ["log-format", None, "text", "text (for people) or json (one JSON object per line, for log collectors)."],
        ["access-log", None, "all",
         "Which answers get an access-log line: all, errors (status 400 and above) or none. Metrics count "
         "every answer either way."],
        ["max-connections", None, DEFAULT_LIMITS.max_connections,
         "Inbound connections served at once; beyond this a new connection gets 503 and is closed.", whole("max-connections")],
        ["idle-timeout", None, DEFAULT_LIMITS.idle_timeout,
         "Seconds an inbound connection may stay silent before it is closed.", seconds("idle-timeout")],
        ["read-timeout", None, DEFAULT_LIMITS.read_timeout,
         "Seconds a caller has from a request's first byte to its last before it gets 408 "
         "(drops slowloris-style clients).", seconds("read-timeout")],
        ["require-token-file", None, None,
         "Only serve callers that send 'Authorization: Bearer <token>' with the token in this file "
         "(re-read when it changes). For deployments that must expose the proxy port beyond loopback."],
        ["grace-period", None, 25.0,
         "Seconds requests in flight may take to finish after SIGTERM before the process exits "
         "(keep it below the Pod's terminationGracePeriodSeconds).", seconds("grace-period")],
        ["cache", None, None,
         "Where the response cache keeps answers: 'memory' (this process) or redis[s]://[[user]:password@]host"
         "[:port][/db], shared by every replica. Default: $AMBASSADOR_CACHE_URL, else memory."],
        ["cache-size", None, "64MiB",
         "Most bytes the in-memory response cache holds (e.g. 64MiB, 512KiB, 1000000); least recently used "
         "answers are evicted first, and an answer larger than an eighth of this is never stored."],
        ["workers", None, 1,
         "Processes serving the proxy port together (for pods with more than one core). The first "
         "serves the admin port for all of them; each gets 1/N of every rate limit, in-flight limit "
         "and of --cache-size.",
         whole("workers")],
        ["replicas-hint", None, None,
         "How many replicas share the Redis of --cache: while Redis is away, each enforces that share of "
         "every rate limit (default 1: each replica then allows the whole limit).",
         whole("replicas-hint")],
        ["config", None, None,
         "YAML file configuring the adapters to serve (several at once, generic http ones included; see "
         "below). Without it every discovered adapter is configured from its environment variables."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["forward-request-id"] = set()
        self["policy"] = []
        self["adapter"] = []
        self["mount"] = []

    _refused = False

    def parseOptions(self, options=None) -> None:
        # Kept to start --workers with the same command line.
        self.arguments = list(sys.argv[1:] if options is None else options)
        try:
            super().parseOptions(options)
        except usage.UsageError:
            self._refused = True  # twistd prints our usage before the error line: a pointer, not the help
            raise

    def opt_adapter(self, name: str) -> None:
        """Serve only the adapter NAME (repeatable). Default: every discovered adapter."""
        self["adapter"].append(name.strip())

    def opt_mount(self, mount: str) -> None:
        """NAME=/path moves adapter NAME's main route, NAME.ROUTE=/path its route ROUTE (repeatable)."""
        try:
            self["mount"].append(Mount.parse(mount))
        except ConfigurationError as e:
            raise usage.UsageError(str(e))

    def opt_plugin_dir(self, directory: str) -> None:
        """Also load adapter dropins from DIRECTORY (repeatable; see AMBASSADOR_PLUGIN_DIRS)."""
        try:
            add_plugin_dirs([directory])  # now, so that a later --help lists their settings too
        except ConfigurationError as e:
            raise usage.UsageError(str(e))

    def opt_policy(self, entry: str) -> None:
        """[ADAPTER.]KEY=VALUE: a resilience setting for every adapter, or for one (repeatable;
        the keys are listed below)."""
        self["policy"].append(entry)

    def opt_forward_request_id(self, adapter: str) -> None:
        """Send the request id upstream as X-Request-ID for this adapter (repeatable; off by default:
        the upstream is an outside service)."""
        self["forward-request-id"].add(adapter)

    def getUsage(self, width=None) -> str:
        if self._refused:  # twistd's app.run prints the options' usage, then the error line
            return "twistd ambassador --help lists every option and environment variable."
        lines = ["", "Environment variables (values are never printed):",
                 f"  {PLUGIN_DIRS_VARIABLE:32} directories of adapter dropins, separated by '{os.pathsep}' "
                 "(like --plugin-dir)",
                 f"  {CACHE_URL_VARIABLE:32} where the response cache keeps answers when --cache is not given "
                 "(memory or redis://…; may hold a password)"]
        lines += [f"  {name:32} {text}" for name, text in TRACING_HELP.items()]
        lines.append("  (tracing: docs/tracing.md; OTEL_EXPORTER_OTLP_HEADERS and the other OTLP variables are "
                     "the SDK's own)")
        for plugin in discover_adapters().adapters:
            lines.append(f"  {plugin.name}: {plugin.description}")
            for setting in plugin.settings:
                lines.append(f"    {setting.name:30} {setting.help}")
        lines += ["", "Policy keys for --policy [ADAPTER.]KEY=VALUE (defaults in brackets):"]
        lines += [f"  {key:22} {text}" for key, text in POLICY_HELP.items()]
        lines += ["", CONFIG_HELP]
        return super().getUsage(width or _columns()) + "\n".join(lines)

    def postOptions(self) -> None:
        from twisted.internet import reactor

        for name in ("connect-timeout", "grace-period", "idle-timeout", "read-timeout"):
            if not self[name] > 0:
                raise usage.UsageError(f"--{name} must be a positive number of seconds")
        if self["max-connections"] < 1:
            raise usage.UsageError("--max-connections must be at least 1")
        if self["workers"] < 1:
            raise usage.UsageError("--workers must be at least 1")
        if self["replicas-hint"] is not None and self["replicas-hint"] < 1:
            raise usage.UsageError("--replicas-hint must be at least 1")
        token = None
        if self["require-token-file"] is not None:
            token = FileSecret(self["require-token-file"])
            if token.current() is None:  # names the path, never what the file holds
                raise usage.UsageError(f"--require-token-file: {self['require-token-file']} "
                                       f"{token.problem}; it must hold the token callers send")
        try:  # the bound is the pod's: each of --workers processes keeps its own share
            cache_bytes = None if self["no-cache"] else parse_size(self["cache-size"]) // self["workers"]
        except ValueError:  # never quotes what was typed
            raise usage.UsageError("--cache-size must be a number of bytes such as 64MiB, 512KiB or 1000000")
        cache_text = (self["cache"] or os.environ.get(CACHE_URL_VARIABLE) or "memory").strip()
        cache_url = None if cache_text == "memory" else cache_text
        if cache_url is not None:
            try:
                parse_redis_url(cache_url)
            except ValueError as e:  # never quotes the URL: it may hold a password
                raise usage.UsageError(f"--cache: memory, or {e}")
        if self["probe-interval"] < 0:
            raise usage.UsageError("--probe-interval must be 0 (off) or a positive number of seconds")
        if self["log-format"] not in ("text", "json"):
            raise usage.UsageError("--log-format must be text or json")
        if self["access-log"] not in ACCESS_LOG_FROM:
            raise usage.UsageError("--access-log must be all, errors or none")
        parent = getattr(self, "parent", None)
        if parent is not None and parent.get("logger") is None:
            if self["log-format"] == "json":
                parent["logger"] = "ambassador.logs.json_observer"
            elif parent.get("nodaemon") and parent.get("logfile") in (None, "", "-") and not parent.get("syslog"):
                # twistd's own lines on stdout, formatted for less (one access-log event per request)
                parent["logger"] = "ambassador.logs.text_observer"
        admin = self["admin-port"].strip()
        endpoint = endpoint_description(self["port"], bare_interface="127.0.0.1")
        admin_endpoint = None if admin == "none" else endpoint_description(admin, bare_interface="0.0.0.0")
        check_endpoint(reactor, "--port", endpoint)
        if admin_endpoint is not None:
            check_endpoint(reactor, "--admin-port", admin_endpoint)
        timeout = [] if self["timeout"] is None else [f"timeout={self['timeout']}"]
        spec = AdapterSpec(config=self["config"], names=self["adapter"], mounts=self["mount"],
                           policy=timeout + self["policy"], workers=self["workers"],
                           forward_request_id=self["forward-request-id"], environ=os.environ)
        try:
            add_plugin_dirs(plugin_dirs_from_environment(os.environ))
            discovery = discover_adapters()
            if self["config"] is None:
                plugins = select_adapters(discovery, self["adapter"])
                check_mount_names(self["mount"], [plugin.name for plugin in plugins])
            if self["list-adapters"] and self["config"] is None:
                print(describe_adapters(discovery, self["mount"], os.environ), end="")
                raise SystemExit(0)
            # Configuring an adapter is how its settings are validated: a bad one is a usage error.
            loaded = load_adapters(spec, reactor, discovery=discovery)
            if self["list-adapters"]:
                print(describe_configured(loaded.adapters, discovery, self["config"]), end="")
                raise SystemExit(0)
            tracing = tracing_wanted(os.environ)
        except ConfigurationError as e:
            raise usage.UsageError(str(e))
        for failure in loaded.failures:
            log.error("Dropin {module} failed to import ({error}); any adapter it provides is not served",
                      module=failure.module, error=failure.error)
        # Only validated values leave postOptions, in one frozen record; makeService builds from it.
        self.settings = Settings(
            adapters=loaded.adapters,
            endpoint=endpoint,
            admin_endpoint=admin_endpoint,
            policies=loaded.policies,
            unconfigured=loaded.unconfigured,
            spec=spec,
            connect_timeout=self["connect-timeout"],
            grace_period=self["grace-period"],
            probe_interval=self["probe-interval"],
            forward_request_id=self["forward-request-id"],
            limits=InboundLimits(max_connections=self["max-connections"], idle_timeout=self["idle-timeout"],
                                 read_timeout=self["read-timeout"]),
            token=token,
            cache_bytes=cache_bytes,
            cache_url=cache_url,
            workers=self["workers"],
            worker=worker_index(),
            worker_args=self.arguments,
            access_log=self["access-log"],
            replicas_hint=self["replicas-hint"],
            tracing=tracing,
        )


def stop_startup(message: str) -> NoReturn:
    """A setting that cannot work, found while starting: one line, then exit 1 (SystemExit: twistd
    prints no traceback for it)."""
    log.critical("{message}", message=message)
    raise SystemExit(1)


def _reason(failure) -> str:
    error = failure.value
    if isinstance(error, CannotListenError):  # says which address, and the system's reason
        reason = getattr(error.socketError, "strerror", None) or error.socketError
        return f"cannot listen on {error.interface or '*'}:{error.port}: {reason}"
    return f"cannot listen: {getattr(error, 'strerror', None) or failure.getErrorMessage()}"


class Listener(Service):
    """Listens on one endpoint description; announces where once the reactor runs.

    ``option`` names the setting in the one line that stops startup when it cannot listen;
    ``fatal`` is called with that line (default ``stop_startup``)."""

    def __init__(self, reactor, endpoint, factory, label: str, *, warn_if_exposed: bool = False,
                 grace_period: float = 0.0, on_listening=None, option: str | None = None,
                 fatal: Callable[[str], object] = stop_startup) -> None:
        self._reactor = reactor
        self._on_listening = on_listening
        self._grace_period = grace_period
        self._endpoint = endpoint
        self._factory = factory
        self._label = label
        self._option = option or label
        self._fatal = fatal
        self._warn_if_exposed = warn_if_exposed
        self.port: IListeningPort | None = None
        self.setName(label)

    @property
    def listening(self) -> bool:
        """Bound and accepting: False before, after stopListening, or once the port was lost."""
        return self.port is not None and getattr(self.port, "connected", True)

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        try:
            endpoint = serverFromString(self._reactor, self._endpoint) if isinstance(self._endpoint, str) else self._endpoint
        except Exception:  # postOptions checked it; a caller of assemble may not have
            self._fatal(f"{self._option}: not an endpoint description")
            return
        failed: list[str] = []
        now = [True]

        def cannot_listen(failure) -> None:
            message = f"{self._option}: {_reason(failure)}"
            if now[0]:
                failed.append(message)
            else:  # an endpoint that listens later: the reactor runs, so stop it
                log.critical("{message}", message=message)
                self._reactor.stop()

        endpoint.listen(self._factory).addCallbacks(self._listening, cannot_listen)
        now[0] = False
        if failed:  # TCP, UNIX and adopted sockets fail at once, before the reactor runs
            self._fatal(failed[0])

    def _listening(self, port) -> None:
        self.port = port
        # Announce once the reactor runs: then signals are handled and requests served.
        self._reactor.callWhenRunning(self._announce, port)
        if self._on_listening is not None:
            self._on_listening(port)

    def _announce(self, port: IListeningPort) -> None:
        address = port.getHost()
        host: str | None = None
        if isinstance(address, (IPv4Address, IPv6Address)):
            host, where = address.host, f"{address.host}:{address.port}"
        else:
            where = getattr(address, "name", str(address))
        if isinstance(where, bytes):  # a UNIX socket's path
            where = where.decode(errors="replace")
        log.info("ambassador {label} listening on {address}", label=self._label, address=where)
        if self._warn_if_exposed and host is not None and not ipaddress.ip_address(host.split("%")[0]).is_loopback:
            log.warn(
                "Listening on {address}, which is not loopback: anyone who reaches this address can use "
                "the ambassador's credentials. Bind 127.0.0.1 unless the pod's network is trusted, "
                "or make callers present a token (--require-token-file).",
                address=where,
            )

    def stopService(self):
        """Stop accepting, then give requests in flight up to the grace period to finish."""
        super().stopService()
        stopped = defer.maybeDeferred(self.port.stopListening) if self.port is not None else defer.succeed(None)
        drain = getattr(self._factory, "drain", None)
        if drain is not None and self._grace_period > 0:
            stopped.addCallback(lambda _: drain(self._grace_period))
        return stopped


class Upkeep(Service):
    """What the adapters need while serving: credential file polling, probes, the client pool,
    the shared cache's Redis connection. A reload (``swap``) starts the new configuration's and
    stops the old one's once no exchange it started can still be running."""

    def __init__(self, reactor, generation: Generation, client: UpstreamClient, redis: RedisStore | None = None) -> None:
        self._reactor = reactor
        self._generation = generation
        self._client = client
        self._redis = redis
        self._retiring: dict[int, Generation] = {}

    def startService(self) -> None:
        super().startService()
        self._start(self._generation)
        if self._redis is not None:
            self._redis.start()

    def swap(self, old: Generation, new: Generation) -> None:
        self._generation = new
        if not self.running:
            return
        self._start(new)
        if old.prober is not None:
            old.prober.stop()
        self._retiring[id(old)] = old
        self._reactor.callLater(old.longest_exchange + 1, self._retire, old)

    def _retire(self, old: Generation) -> None:
        if self._retiring.pop(id(old), None) is not None:
            self._stop(old)

    def _start(self, generation: Generation) -> None:
        for adapter in generation.adapters:
            adapter.credential.start(self._reactor, self._client)
        if generation.prober is not None:
            generation.prober.start()

    @staticmethod
    def _stop(generation: Generation) -> None:
        for adapter in generation.adapters:
            adapter.credential.stop()
        if generation.prober is not None:
            generation.prober.stop()

    def stopService(self):
        super().stopService()
        for generation in [self._generation, *self._retiring.values()]:
            self._stop(generation)
        self._retiring.clear()
        closing = [self._client.close()] + ([self._redis.stop()] if self._redis is not None else [])
        return defer.DeferredList(closing)


@define(slots=False)
class Ambassador:
    """The assembled parts: ``service`` to run, the rest for whoever needs to look inside (tests);
    ``reloader`` is what SIGHUP calls (None without an AdapterSpec in the settings)."""

    service: MultiService
    proxy: Listener
    admin: Listener | None
    metrics: Metrics
    health: Health
    cache: ResponseCache | None
    wiring: Wiring
    reloader: Reloader | None = None
    pool: WorkerPool | None = None  # the primary's, with --workers (SIGHUP is passed on to them)
    url: str = ""  # where the proxy and admin listen, once a caller records it (ambassador.testing)
    admin_url: str = ""
    tracing: Tracing | None = None  # on: what makeService shuts down once the drain is over

    @property
    def readiness(self) -> Readiness:
        """The running configuration's adapter states."""
        return self.health.readiness


def assemble(reactor, settings: Settings, *, clock=None, rng=None,
             peers: tuple[str, int, int] | None = None, fatal: Callable[[str], object] = stop_startup) -> Ambassador:
    """Wire the adapters, pipeline, proxy and admin listeners that ``settings`` describe together.
    ``clock`` drives every timer, ``rng`` (a random.Random) the retry jitter. With ``workers`` > 1
    the primary (``worker`` 0) starts the others with ``worker_args`` (see ambassador.app.workers),
    and each asks the others for the keys they own (ambassador.cache.peers). ``peers`` (directory,
    index, count) sets that up without workers (tests). ``fatal`` is called with the one line
    saying why a listener cannot listen (default: log it and exit 1). What depends on the adapters
    is one ``Generation`` (ambassador.app.reload), which a reload replaces."""
    limits, grace_period = settings.limits, settings.grace_period
    workers, worker, cache_bytes = settings.workers, settings.worker, settings.cache_bytes
    endpoint: str | AdoptedEndpoint
    endpoint, admin_endpoint, probe_interval = settings.endpoint, settings.admin_endpoint, settings.probe_interval
    clock = clock or reactor
    peer_dir = None
    if workers > 1 and peers is None and cache_bytes is not None:
        peer_dir = _peer_directory(reactor, worker)
        peers = (peer_dir, worker, workers) if peer_dir is not None else None
    label, report = "", None
    if worker > 0:  # a worker: the primary's socket, a loopback admin listener for the primary only
        endpoint, label, probe_interval = AdoptedEndpoint(reactor), f"worker {worker} ", 0.0
        if admin_endpoint is not None:
            admin_endpoint, report = "tcp:0:interface=127.0.0.1", lambda port: report_admin_port(port.getHost().port)
        reactor.callWhenRunning(stop_when_primary_ends, reactor, peer_dir)
    metrics = Metrics()
    tracing = Tracing.from_environment(os.environ) if settings.tracing else None
    if tracing is not None:
        log.info("Tracing on: spans exported over OTLP/HTTP as the OTEL_* variables say")
    client = UpstreamClient(reactor, connect_timeout=settings.connect_timeout)
    cache = redis = None
    replicas = settings.replicas_hint or 1
    if settings.cache_url is not None:  # Redis: the cache (unless off) and the rate limits are the Deployment's
        sharing = SharedLimits([adapter.name for adapter in settings.adapters], replicas,
                               metrics.rate_limit_mode.labels)
        redis = RedisStore(settings.cache_url, reactor, clock=clock, on_change=sharing.changed)
    if cache_bytes is not None and redis is not None:
        shared = SharedStore(redis, cache_bytes // ENTRY_SHARE)
        cache = ResponseCache(shared, clock, Leases(redis, shared, clock))
    elif cache_bytes is not None:
        store = MemoryStore(cache_bytes)
        metrics.watch_cache(store)
        cache = ResponseCache(store, clock)
    peering = None
    if peers is not None and cache is not None:
        peering = Peers(reactor, *peers, metrics, clock=clock)

    def make_gateway(adapters, readiness: Readiness, guards: dict[str, Guard], policies) -> Gateway:
        if redis is not None:
            for adapter in adapters:
                share_bucket(guards[adapter.name], policies[adapter.name], adapter, redis, clock, workers * replicas)
        return Gateway(client, clock, metrics, readiness, guards, forward_request_id=settings.forward_request_id,
                       rng=rng, cache=cache, peers=peering, tracing=tracing)

    def make_prober(readiness: Readiness, gateway: Gateway) -> Prober | None:
        return Prober(readiness, gateway, clock, probe_interval) if probe_interval > 0 else None

    wiring = Wiring(make_gateway, make_prober, clock, workers=workers, cache_store=redis)
    generation = wiring.build(settings.adapters, settings.policies, settings.unconfigured)
    wiring.current = generation
    if redis is not None and settings.replicas_hint is None and worker == 0 and any(
            guard.bucket is not None for guard in generation.guards.values()):
        log.warn("Rate limits are shared through Redis; while it is away each replica allows the whole "
                 "limit, so a Deployment of several may exceed it: set --replicas-hint to their number")
    health = wiring.health = Health(generation.readiness)
    metrics.watch(health)
    service = MultiService()
    wiring.upkeep = upkeep = Upkeep(clock, generation, client, redis)
    upkeep.setServiceParent(service)
    if peering is not None:
        peering.setServiceParent(service)
        peer_site = PeerFactory(generation.adapters, generation.gateway, clock, limits=limits)
        wiring.sites.append(peer_site)
        peer_listener = Listener(reactor, peering.listening_endpoint(reactor), peer_site, label + "peers",
                                 grace_period=grace_period, option="the peer socket", fatal=fatal)
        peer_listener.setServiceParent(service)
        health.listeners.append(peer_listener)
    routes = ", ".join(f"{route.path} ({adapter.name})" for adapter in generation.adapters for route in adapter.routes)
    log.info("Routes: {routes}", routes=routes or "none")
    site = ProxyFactory(generation.adapters, generation.gateway, metrics, clock, limits=limits, token=settings.token,
                        access_log=settings.access_log, tracing=tracing)
    wiring.sites.append(site)
    proxy = Listener(reactor, endpoint, site, label + "proxy", warn_if_exposed=worker == 0, grace_period=grace_period,
                     on_listening=accept_one_at_a_time if workers > 1 or worker > 0 else None, option="--port",
                     fatal=fatal)
    proxy.setServiceParent(service)
    health.listeners.append(proxy)
    pool = None
    if workers > 1 and worker == 0:
        pool = WorkerPool(reactor, workers, list(settings.worker_args), proxy, grace_period=grace_period, peer_dir=peer_dir)
        pool.setServiceParent(service)
    admin = None
    if admin_endpoint is not None:
        admin = Listener(reactor, admin_endpoint, admin_site(health, metrics, workers=pool), label + "admin",
                         on_listening=report, option="--admin-port", fatal=fatal)
        admin.setServiceParent(service)
        health.listeners.append(admin)
    reloader = Reloader(settings.spec, wiring, reactor, metrics.reloads) if settings.spec is not None else None
    return Ambassador(service, proxy, admin, metrics, health, cache, wiring, reloader, pool, tracing=tracing)


def share_bucket(guard: Guard, pod: Policy, adapter, redis: RedisStore, clock, processes: int) -> None:
    """``guard``'s rate limit kept in Redis for the Deployment, as the Pod's policy ``pod`` says it, and
    this process's share of the ``processes`` (workers × replicas) enforced here while Redis is away."""
    if not isinstance(guard.bucket, TokenBucket) or pod.rate_limit is None:
        return  # no limit, or shared already (a guard a reload kept)
    alone = share_of(pod, processes)
    assert alone.rate_limit is not None
    guard.bucket = SharedBucket(redis, adapter, clock, pod, TokenBucket(clock, alone.rate_limit, alone.burst,
                                                                        alone.rate_queue))


def _peer_directory(reactor, worker: int) -> str | None:
    """Where the processes' peer sockets are: the primary makes the directory (mode 0700, only this
    user's processes can connect), a worker is told it."""
    if worker > 0:
        return os.environ.get(PEER_DIR_VARIABLE) or None
    try:
        directory = tempfile.mkdtemp(prefix="ambassador-peers-")
    except OSError as e:
        log.warn("No directory for the workers' sockets ({error}; set TMPDIR to a writable directory): "
                 "each process fetches its own cache misses", error=e.strerror)
        return None
    # Once every service has stopped: the workers have ended, and each listener removed its socket.
    reactor.addSystemEventTrigger("after", "shutdown", shutil.rmtree, directory, True)
    return directory


def makeService(options: Options) -> MultiService:
    from twisted.internet import reactor

    settings = options.settings
    if settings.workers > 1 and settings.worker == 0:
        os.environ[WORKER_VARIABLE] = "0"  # the primary: its JSON log lines say worker 0
    reactor.callWhenRunning(_stop_cleanly_on_sigterm, reactor)
    parent = getattr(options, "parent", None)
    pidfile: str = (parent.get("pidfile") if parent is not None else None) or ""

    def fatal(message: str) -> None:
        # SystemExit passes by twistd's clean-up: remove the pid file it wrote for this process.
        try:
            with open(pidfile) as written:
                if written.read().strip() == str(os.getpid()):
                    os.remove(pidfile)
        except OSError:  # none (--pidfile=), or not ours
            pass
        stop_startup(message)

    ambassador = assemble(reactor, settings, fatal=fatal)
    if ambassador.tracing is not None:  # "after": once the drain has ended the last requests' spans
        reactor.addSystemEventTrigger("after", "shutdown", ambassador.tracing.shutdown)
    if ambassador.reloader is not None:
        reactor.callWhenRunning(reload_on_sighup, reactor, ambassador.reloader, ambassador.pool)
    return ambassador.service


def _stop_cleanly_on_sigterm(reactor) -> None:
    """SIGTERM is how Kubernetes asks a pod to stop: stop the reactor (the drain runs in its shutdown)
    and exit 0. twistd's own handler makes the process re-raise the signal at the end and die by it.
    Installed once the reactor runs, after the reactor's own handlers."""

    def stop() -> None:
        try:
            reactor.stop()
        except ReactorNotRunning:  # a second SIGTERM while draining
            pass

    signal.signal(signal.SIGTERM, lambda signum, frame: reactor.callFromThread(stop))
