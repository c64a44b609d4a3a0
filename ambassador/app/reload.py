"""SIGHUP: build the adapters' configuration again, completely, then swap it in for new requests.

What is rebuilt is what ``AdapterSpec`` describes: the ``--config`` file, the
credential files it and the environment name, and the dropins of
``--plugin-dir``. Everything is built and validated before anything changes
(the adapters, their mounts, their policies); a mistake leaves the running
configuration serving and is said in one log line naming the file and key
(``ConfigurationError``'s message, never a value). On success the new
``Generation`` — adapters, their guards, readiness, gateway and prober — is
swapped in: the Sites route new requests through it (their root resource is
replaced), while a request already routed keeps the handler, adapter and
gateway it started with and finishes on them. Listeners, the connection pool,
the cache and the metrics stay; so does an adapter's breaker and rate limit
when its policy and base URL did not change.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Mapping
from typing import Any

from attrs import define, field, frozen
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ambassador.app.configfile import adapters_from_file
from ambassador.app.discovery import Discovery, ImportFailure, discover_adapters
from ambassador.app.health import Health, Prober, Readiness
from ambassador.app.mounting import check_mount_names, mounted, select_adapters
from ambassador.app.settings import AdapterSpec
from ambassador.interfaces import ConfigurationError, IExternalAdapter
from ambassador.pipeline.decoding import ACCEPT_ENCODINGS
from ambassador.pipeline.gateway import Gateway
from ambassador.pipeline.guard import Guard
from ambassador.pipeline.resilience import Policy, resolve_policies
from ambassador.web.proxy import mount_table

log = Logger(namespace="ambassador")


@frozen
class Loaded:
    """The adapters an AdapterSpec describes, validated: ``unconfigured`` those only discovered.
    ``policies`` are the Pod's, as configured; each process's share is taken when its Guards are built."""

    adapters: tuple[IExternalAdapter, ...]
    policies: Mapping[str, Policy]
    unconfigured: frozenset[str]
    failures: tuple[ImportFailure, ...]


def _credential_settings_set(plugin, environ: Mapping[str, str]) -> bool:
    """Whether any variable that gives ``plugin`` a credential (a secret one, or a ``_FILE``) is set."""
    return any(environ.get(s.name, "").strip() for s in plugin.settings if s.secret or s.name.endswith("_FILE"))


def load_adapters(spec: AdapterSpec, reactor, *, discovery: Discovery | None = None,
                  fresh: bool = False) -> Loaded:
    """Configure, mount and give a policy to every adapter ``spec`` asks for; ConfigurationError
    (naming the setting, file and key, never a value) when one cannot work. ``fresh``: import the
    --plugin-dir dropins again (a reload)."""
    environ = spec.environ
    if discovery is None:
        discovery = discover_adapters(fresh=fresh)
    unconfigured: set[str] = set()
    if spec.config is None:
        plugins = select_adapters(discovery, spec.names)
        check_mount_names(spec.mounts, [plugin.name for plugin in plugins])
        configured = [plugin.configure(environ, reactor) for plugin in plugins]
        if not spec.names:  # every discovered adapter: one nobody configured does not block readiness
            unconfigured = {adapter.name for plugin, adapter in zip(plugins, configured)
                            if not adapter.credential.present() and not _credential_settings_set(plugin, environ)}
    else:  # the file says which adapters; their variables fill in the rest
        configured = adapters_from_file(spec.config, environ, discovery.adapters, reactor)
        configured = [a for a in configured if not spec.names or a.name in spec.names]
        check_mount_names(spec.mounts, [adapter.name for adapter in configured])
    adapters = [mounted(adapter, spec.mounts) for adapter in configured]
    for adapter in adapters:  # a plugin's own attribute; the config file's key is checked where it is read
        if getattr(adapter, "accept_encoding", "identity") not in ACCEPT_ENCODINGS:
            raise ConfigurationError(f"the {adapter.name} adapter's accept_encoding: expected "
                                     f"{' or '.join(ACCEPT_ENCODINGS)}")
    mount_table(adapters)
    policies = resolve_policies(adapters, list(spec.policy))
    if spec.forward_request_id - {adapter.name for adapter in adapters}:
        raise ConfigurationError("--forward-request-id must name an adapter that is served "
                                 "(--list-adapters lists them)")
    return Loaded(tuple(adapters), policies, frozenset(unconfigured), discovery.failures)


@define
class Generation:
    """One configuration's serving parts: a reload builds the next one beside it."""

    adapters: tuple[IExternalAdapter, ...]
    guards: dict[str, Guard]
    readiness: Readiness
    gateway: Gateway
    prober: Prober | None

    @property
    def longest_exchange(self) -> float:
        """Seconds after which no exchange this generation started can still run (each one's deadline)."""
        return max((guard.policy.timeout for guard in self.guards.values()), default=0.0)


@define
class Wiring:
    """Builds Generations from the parts that outlive them (client, metrics, cache, clock, ...)
    and swaps them into the Sites, the Health and the Upkeep."""

    make_gateway: Callable[[tuple, Readiness, dict[str, Guard], Mapping[str, Policy]], Gateway]
    make_prober: Callable[[Readiness, Gateway], Prober | None]
    clock: IReactorTime
    workers: int = 1  # processes serving together: each Guard holds this process's share of the Pod's policy
    cache_store: object = None
    health: Health | None = None
    sites: list = field(factory=list)
    upkeep: Any = None  # ambassador.app.service.Upkeep
    current: Generation | None = None

    def build(self, adapters, policies: Mapping[str, Policy], unconfigured: frozenset[str] = frozenset()) -> Generation:
        from ambassador.app.workers import share_of  # workers imports the pipeline's client: late, as service does

        previous = self.current
        guards = {}
        policies = {adapter.name: policies.get(adapter.name) or resolve_policies([adapter], [])[adapter.name]
                    for adapter in adapters}
        for adapter in adapters:
            policy = share_of(policies[adapter.name], self.workers)
            kept = previous.guards.get(adapter.name) if previous is not None else None
            if kept is None or kept.policy != policy or _base_url(previous, adapter.name) != adapter.base_url:
                kept = Guard.of(policy, self.clock, adapter.name)  # else its breaker and rate limit carry on
            guards[adapter.name] = kept
        readiness = Readiness.of(adapters, {name: guard.breaker for name, guard in guards.items()}, unconfigured)
        readiness.cache_store = self.cache_store  # type: ignore[assignment]  # a StoreState or None
        gateway = self.make_gateway(adapters, readiness, guards, policies)
        return Generation(tuple(adapters), guards, readiness, gateway, self.make_prober(readiness, gateway))

    def swap(self, generation: Generation) -> None:
        """New requests are served by ``generation`` from now on."""
        for site in self.sites:
            site.reroute(generation.adapters, generation.gateway)
        if self.health is not None:
            self.health.readiness = generation.readiness
        if self.upkeep is not None and self.current is not None:
            self.upkeep.swap(self.current, generation)
        self.current = generation


def _base_url(generation: Generation | None, name: str) -> str | None:
    adapters = generation.adapters if generation is not None else ()
    return next((adapter.base_url for adapter in adapters if adapter.name == name), None)


class Reloader:
    """``reload()`` (on SIGHUP): load ``spec`` again, build, swap; count and log the outcome."""

    def __init__(self, spec: AdapterSpec, wiring: Wiring, reactor, counter) -> None:
        self._spec = spec
        self._wiring = wiring
        self._reactor = reactor
        self._counter = counter  # ambassador_reloads_total, by outcome

    def reload(self) -> bool:
        where = f" from {self._spec.config}" if self._spec.config else ""
        try:
            loaded = load_adapters(self._spec, self._reactor, fresh=True)
            generation = self._wiring.build(loaded.adapters, loaded.policies, loaded.unconfigured)
        except ConfigurationError as e:
            return self._failed(str(e))
        except Exception as e:  # a dropin's own bug: say what kind, not its text (it may quote a value)
            return self._failed(f"{type(e).__name__} while building the adapters")
        self._wiring.swap(generation)
        health = self._wiring.health
        if health is not None:
            health.reload_error = None
        self._counter.labels("ok").inc()
        routes = ", ".join(f"{route.path} ({adapter.name})" for adapter in loaded.adapters for route in adapter.routes)
        log.info("Reloaded the configuration{where}; new requests are served with it. Routes: {routes}",
                 where=where, routes=routes or "none")
        for failure in loaded.failures:
            log.error("Dropin {module} failed to import ({error}); any adapter it provides is not served",
                      module=failure.module, error=failure.error)
        return True

    def _failed(self, message: str) -> bool:
        health = self._wiring.health
        if health is not None:
            health.reload_error = message
        self._counter.labels("error").inc()
        log.error("Reload failed, the running configuration stays: {error}", error=message)
        return False


def reload_on_sighup(reactor, reloader: Reloader, pool=None) -> None:
    """Install the SIGHUP handler (once the reactor runs). With --workers the primary passes the
    signal on to every worker, each of which reloads itself (files are read by each process)."""

    def hup() -> None:
        if pool is not None:
            for worker in list(pool.workers.values()):
                if worker.transport is not None:
                    worker.transport.signalProcess("HUP")
        reloader.reload()

    signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(hup))
