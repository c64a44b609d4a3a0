"""The settings ``twistd ambassador`` runs with: one frozen record that ``Options.postOptions``
produces once every option is validated, and that ``makeService`` builds the services from
(the shape of twisted/web/tap.py, with the validated values kept apart from the options dict)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

from attrs import field, frozen

from ambassador.app.mounting import Mount
from ambassador.cache.responses import DEFAULT_CACHE_BYTES
from ambassador.credentials.sources import FileSecret
from ambassador.interfaces import IExternalAdapter
from ambassador.pipeline.resilience import Policy
from ambassador.web.limits import InboundLimits


def _adapters(adapters: Iterable[IExternalAdapter]) -> tuple[IExternalAdapter, ...]:
    return tuple(adapters)


def _read_only(policies: Mapping[str, Policy]) -> Mapping[str, Policy]:
    return MappingProxyType(dict(policies))


def _snapshot(environ: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(environ))


@frozen(kw_only=True)
class AdapterSpec:
    """What the served adapters are built from, kept so that SIGHUP can build them again
    (``ambassador.app.reload.load_adapters``): ``config`` the --config file, ``names`` the --adapter
    names, ``mounts``, ``policy`` the --timeout and --policy entries in order, ``environ`` the
    environment at start (a process's environment does not change; files named in it do)."""

    config: str | None = None
    names: tuple[str, ...] = field(default=(), converter=tuple)
    mounts: tuple[Mount, ...] = field(default=(), converter=tuple)
    policy: tuple[str, ...] = field(default=(), converter=tuple)
    workers: int = 1
    forward_request_id: frozenset[str] = field(default=frozenset(), converter=frozenset)
    environ: Mapping[str, str] = field(factory=dict, converter=_snapshot, repr=False, eq=False)


@frozen(kw_only=True)
class Settings:
    """Every setting, typed, with what is derived from them computed once.

    ``adapters`` are the configured adapters, mounted where they serve; ``endpoint`` and
    ``admin_endpoint`` endpoint descriptions (``admin_endpoint`` None: no admin port); ``policies``
    each adapter's resilience policy for the Pod (an adapter left out gets the defaults; each of
    ``workers`` processes takes its share); ``token`` the caller token's file, read once to validate it;
    ``cache_bytes`` this process's share of the cache bound (None: no cache); ``cache_url`` the
    Redis URL of a shared cache (None: in memory); ``worker`` this process's index among
    ``workers``, and ``worker_args`` the command line the primary starts the others with;
    ``replicas_hint`` how many replicas share Redis (None: not said, taken as 1): each one's share of a
    rate limit while Redis is away; ``unconfigured`` the adapters only discovered (not named, no
    credential variable set: they do not block readiness); ``spec`` what SIGHUP rebuilds the adapters
    from (None: no reload); ``tracing`` whether the OTEL_* variables turn tracing on (ambassador.tracing)."""

    adapters: tuple[IExternalAdapter, ...] = field(converter=_adapters)
    endpoint: str
    admin_endpoint: str | None
    policies: Mapping[str, Policy] = field(factory=dict, converter=_read_only)
    connect_timeout: float = 3.0
    grace_period: float = 25.0
    probe_interval: float = 0.0
    forward_request_id: frozenset[str] = field(default=frozenset(), converter=frozenset)
    limits: InboundLimits = InboundLimits()
    token: FileSecret | None = None
    cache_bytes: int | None = DEFAULT_CACHE_BYTES
    cache_url: str | None = None
    workers: int = 1
    worker: int = 0
    worker_args: tuple[str, ...] = field(default=(), converter=tuple)
    access_log: str = "all"
    replicas_hint: int | None = None
    unconfigured: frozenset[str] = frozenset()
    spec: AdapterSpec | None = None
    tracing: bool = False
