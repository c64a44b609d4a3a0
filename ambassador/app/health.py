"""Health: is the ambassador itself able to serve (liveness, readiness), and how are the outside
services it calls doing (``/upstreams``) — two questions kept apart on purpose.

A sidecar's readiness is its Pod's: if an outside service that is down, slow
or rejecting the credential made the ambassador unready, one TMDB outage
would take every replica (and the application next to it, cached answers
included) out of its Service at once. Readiness therefore covers what the
ambassador controls: its listeners are bound, its configuration is loaded,
each adapter it was asked to serve has a credential. What the pipeline learns
about the outside service (the credential was rejected, the circuit is open,
a probe failed) is reported per adapter on ``/upstreams``, in metrics and in
the log. An optional probe asks the upstream a cheap question on an interval
for adapters that name one (``probe_path``).
"""

from __future__ import annotations

from typing import Protocol

from attrs import define, field
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ambassador.interfaces import IExternalAdapter
from ambassador.pipeline.stages.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker

log = Logger(namespace="ambassador")
_CIRCUIT = {CLOSED: "closed", OPEN: "open", HALF_OPEN: "half-open"}


class StoreState(Protocol):
    """What readiness reads of a shared cache store (RedisStore)."""

    @property
    def description(self) -> str: ...

    @property
    def available(self) -> bool: ...


class Listening(Protocol):
    """What liveness reads of a listener (ambassador.app.service.Listener)."""

    name: str | None

    @property
    def listening(self) -> bool: ...


@define
class AdapterState:
    """One served adapter: ``configured`` False for an adapter that was only discovered (not named by
    --adapter or --config, no credential variable set): it is listed, and does not block readiness."""

    adapter: IExternalAdapter
    breaker: CircuitBreaker | None = None
    credential_rejected: bool = False
    probe_failure: str | None = None
    configured: bool = True
    _rejected_fingerprint: str | None = field(default=None, init=False)  # of the credential value the upstream last rejected

    def credential_refused(self, status: int) -> None:
        """The upstream rejected the credential (``status``: its answer's). Logged once per credential
        value, by fingerprint: a rotation to a value that is rejected too is logged again."""
        fingerprint = _fingerprint_of(self.adapter.credential)
        if not self.credential_rejected or fingerprint != self._rejected_fingerprint:
            log.warn("The {adapter} service rejected the credential with fingerprint {fingerprint} (status "
                     "{status}); its answers are 502 credential-rejected until it takes one",
                     adapter=self.adapter.name, fingerprint=fingerprint, status=status)
        self.credential_rejected, self._rejected_fingerprint = True, fingerprint

    def credential_accepted(self) -> None:
        """The upstream answered as one that took the credential."""
        if self.credential_rejected:
            log.info("The {adapter} service accepts the credential again (fingerprint {fingerprint})",
                     adapter=self.adapter.name, fingerprint=_fingerprint_of(self.adapter.credential))
        self.credential_rejected, self._rejected_fingerprint = False, None

    def reasons(self) -> list[str]:
        """Why readiness counts the adapter as unable to serve: a configured adapter without its
        credential. Empty when it can serve (whatever the upstream is doing)."""
        credential = self.adapter.credential
        if self.configured and not credential.present():
            return ["credential missing: " + credential.missing_reason(self.adapter.name)]
        return []

    def upstream_reasons(self) -> list[str]:
        """What is known to be wrong with the outside service, or with how it takes the credential."""
        reasons = []
        if self.credential_rejected:
            reasons.append("credential rejected by the upstream")
        if self.breaker is not None and self.breaker.state == OPEN:
            reasons.append("circuit open: recent upstream calls kept failing")
        if self.probe_failure:
            reasons.append("probe failed: " + self.probe_failure)
        return reasons

    def report(self) -> dict:
        """The adapter's entry in /readyz."""
        credential = self.adapter.credential
        if not self.configured and not credential.present():
            return {"configured": False, "detail": "not configured: " + credential.missing_reason(self.adapter.name)}
        reasons = self.reasons()
        warning = credential.warning()
        return {"configured": True, "ready": not reasons, "reasons": reasons,
                **({"warnings": [warning]} if warning else {})}

    def upstream_report(self) -> dict:
        """The adapter's entry in /upstreams."""
        credential = self.adapter.credential
        reasons = self.upstream_reasons()
        warning = credential.warning()  # e.g. an OAuth2 token endpoint failing: an outside service too
        return {"up": not reasons, "reasons": reasons, **({"warnings": [warning]} if warning else {}),
                "circuit": _CIRCUIT[self.breaker.state] if self.breaker is not None else "off",
                "credential": "present" if credential.present() else
                              "missing" if self.configured else "not configured",
                "probed": bool(getattr(self.adapter, "probe_path", None))}


def _fingerprint_of(credential) -> str:
    """The credential's fingerprint (a digest, never the value); "-" for one that offers none."""
    fingerprint = getattr(credential, "fingerprint", None)
    return fingerprint() if fingerprint is not None else "-"


@define
class Readiness:
    """The adapter states of one configuration (a reload makes new ones: ambassador.app.reload)."""

    adapters: list[AdapterState]
    _by_name: dict[str, AdapterState] = field(init=False)
    cache_store: StoreState | None = None  # a shared cache store (RedisStore): its outage is a warning, not unready

    def __attrs_post_init__(self) -> None:
        self._by_name = {state.adapter.name: state for state in self.adapters}

    @classmethod
    def of(cls, adapters, breakers: dict[str, CircuitBreaker | None],
           unconfigured: frozenset[str] = frozenset()) -> Readiness:
        return cls([AdapterState(adapter, breakers.get(adapter.name), configured=adapter.name not in unconfigured)
                    for adapter in adapters])

    def __getitem__(self, name: str) -> AdapterState:
        return self._by_name[name]

    def report(self) -> dict:
        adapters = {state.adapter.name: state.report() for state in self.adapters}
        report = {"ready": all(a.get("ready", True) for a in adapters.values()), "adapters": adapters}
        store = self.cache_store
        if store is not None:
            report["cache"] = {"store": store.description, "available": store.available}
            if not store.available:
                report["warnings"] = [f"the shared cache {store.description} is unreachable: answers come "
                                      "from the upstream until it is back"]
        return report


class Health:
    """What the admin listener and the metrics read: the running configuration's Readiness
    (swapped by a reload), the listeners, and the outcome of the last reload."""

    def __init__(self, readiness: Readiness) -> None:
        self.readiness = readiness
        self.listeners: list = []  # of Listening (twisted's Service types its name as None)
        self.reload_error: str | None = None  # the last reload's failure, until one succeeds

    @property
    def adapters(self) -> list[AdapterState]:
        return self.readiness.adapters

    @property
    def cache_store(self) -> StoreState | None:
        return self.readiness.cache_store

    def lost(self) -> list[str]:
        """The listeners that are not listening (any: the process can no longer serve)."""
        return [listener.name or "?" for listener in self.listeners if not listener.listening]

    def report(self) -> dict:
        """/readyz: listeners bound, configuration loaded, each served adapter has its credential."""
        report = self.readiness.report()
        lost = self.lost()
        if lost:
            report["ready"] = False
            report["listeners_lost"] = lost
        if self.reload_error is not None:
            report.setdefault("warnings", []).append(
                f"the last reload failed ({self.reload_error}); the previous configuration is serving")
        return report

    def upstreams(self) -> dict:
        """/upstreams: what is known of each outside service; never part of readiness."""
        report: dict = {"adapters": {state.adapter.name: state.upstream_report() for state in self.adapters}}
        store = self.cache_store
        if store is not None:
            report["cache"] = {"store": store.description, "available": store.available}
        return report


class Prober:
    """Asks each adapter's upstream for ``probe_path`` every ``interval`` seconds."""

    def __init__(self, readiness: Readiness, gateway, clock: IReactorTime, interval: float) -> None:
        self._readiness = readiness
        self._gateway = gateway
        self._loop = LoopingCall(self._probe_all)
        self._loop.clock = clock
        self._interval = interval

    def start(self) -> None:
        self._loop.start(self._interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def _probe_all(self):
        from twisted.internet.defer import DeferredList

        probes = []
        for state in self._readiness.adapters:
            path = getattr(state.adapter, "probe_path", None)
            if path and state.adapter.credential.present():
                probes.append(self._gateway.probe(state.adapter, path).addBoth(self._record, state))
        return DeferredList(probes)

    @staticmethod
    def _record(failure_text: str | None, state: AdapterState) -> None:
        if failure_text != state.probe_failure:
            log.info("Probe of {adapter}: {result}", adapter=state.adapter.name, result=failure_text or "ok")
        state.probe_failure = failure_text
