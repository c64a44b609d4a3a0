"""Readiness: is each mounted adapter able to serve, and if not, why.

The pipeline reports what it learns (the upstream rejected the credential;
a later answer shows it works again); an optional probe asks the upstream a
cheap question on an interval for adapters that name one (``probe_path``).
"""

from __future__ import annotations

from typing import Protocol

from attrs import define, field
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ambassador.interfaces import IExternalAdapter
from ambassador.pipeline.stages.breaker import OPEN, CircuitBreaker

log = Logger(namespace="ambassador")


class StoreState(Protocol):
    """What readiness reads of a shared cache store (RedisStore)."""

    @property
    def description(self) -> str: ...

    @property
    def available(self) -> bool: ...


@define
class AdapterState:
    adapter: IExternalAdapter
    breaker: CircuitBreaker | None = None
    credential_rejected: bool = False
    probe_failure: str | None = None

    def reasons(self) -> list[str]:
        """Why the adapter cannot serve now; empty when it can."""
        reasons = []
        credential = self.adapter.credential
        if not credential.present():
            reasons.append("credential missing: " + credential.missing_reason(self.adapter.name))
        elif self.credential_rejected:
            reasons.append("credential rejected by the upstream")
        if self.breaker is not None and self.breaker.state == OPEN:
            reasons.append("circuit open: recent upstream calls kept failing")
        if self.probe_failure:
            reasons.append("probe failed: " + self.probe_failure)
        return reasons

    def report(self) -> dict:
        reasons = self.reasons()
        warning = self.adapter.credential.warning()
        return {"ready": not reasons, "reasons": reasons, **({"warnings": [warning]} if warning else {})}


@define
class Readiness:
    adapters: list[AdapterState]
    _by_name: dict[str, AdapterState] = field(init=False)
    cache_store: StoreState | None = None  # a shared cache store (RedisStore): its outage is a warning, not unready

    def __attrs_post_init__(self) -> None:
        self._by_name = {state.adapter.name: state for state in self.adapters}

    @classmethod
    def of(cls, adapters, breakers: dict[str, CircuitBreaker | None]) -> Readiness:
        return cls([AdapterState(adapter, breakers.get(adapter.name)) for adapter in adapters])

    def __getitem__(self, name: str) -> AdapterState:
        return self._by_name[name]

    def report(self) -> dict:
        adapters = {state.adapter.name: state.report() for state in self.adapters}
        report = {"ready": all(a["ready"] for a in adapters.values()), "adapters": adapters}
        store = self.cache_store
        if store is not None:
            report["cache"] = {"store": store.description, "available": store.available}
            if not store.available:
                report["warnings"] = [f"the shared cache {store.description} is unreachable: answers come "
                                      "from the upstream until it is back"]
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
