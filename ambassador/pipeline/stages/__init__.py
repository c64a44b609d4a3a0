"""The stages an upstream exchange goes through, outermost first.

Each stage is one concern in one module and wraps the next, the way Twisted
composes client features by wrapping one ``IAgent`` in another: a stage is
an async callable taking a ``Call`` and returning the upstream's
``UpstreamResponse``, or raising a ``Problem`` (or ``CancelledError`` when the
caller left). ``ambassador.pipeline.gateway`` builds one chain per adapter,
leaving out the stages its policy turns off::

    Deadline → Retry → Breaker → Credential → RateLimit → Concurrency → Send

The order is the policy's meaning: the deadline covers every attempt; each
retry passes the breaker again, gets the credential attached again (and
refreshed once after a 401), takes its own rate token and in-flight slot;
``Send`` makes the one call. Above the chain, ``caching`` serves GET and HEAD
from the response cache and calls the chain for what it must fetch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from attrs import define

from ambassador.exchange import Trace, UpstreamRequest, UpstreamResponse
from ambassador.interfaces import IExternalAdapter


@define
class Call:
    """One exchange with the upstream as it passes through the stages."""

    adapter: IExternalAdapter
    request: UpstreamRequest
    trace: Trace
    deadline: float = math.inf  # on the clock; set by the Deadline stage
    refreshed: bool = False  # the credential was refreshed once already in this exchange

    def with_request(self, request: UpstreamRequest) -> Call:
        """This call sending ``request``: what ``attrs.evolve`` does, without its look at the fields."""
        return Call(self.adapter, request, self.trace, self.deadline, self.refreshed)


#: A stage, or the rest of the chain below it.
Stage = Callable[[Call], Coroutine[Any, Any, UpstreamResponse]]


class Counted(Protocol):
    """A counter a stage counts its events on (prometheus_client's, bound to the adapter's labels)."""

    def inc(self) -> None: ...

#: Problem kinds that say an attempt reached for the upstream and failed (not a refusal of our own); the
#: forward proxy's failures count: the upstream is as unreachable through a proxy that cannot carry the call.
ATTEMPT_FAILURES = frozenset({"upstream-unreachable", "upstream-timeout", "upstream-too-large", "proxy-failed",
                              "proxy-timeout"})
