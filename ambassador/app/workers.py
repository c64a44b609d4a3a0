"""``--workers N``: N processes serving one listening socket, for pods with more than one core.

The process twistd starts (the *primary*) listens, serves like a single
ambassador does, and starts N-1 *workers*: the same command line run again
with ``AMBASSADOR_WORKER=<index>`` in the environment, the listening socket
as file descriptor 3 (``adoptStreamPort``) and a pipe on file descriptor 4
on which a worker reports the port of its own loopback-only admin listener.
The kernel hands each new connection to whichever process accepts it first.

- **Admin.** Only the primary serves ``--admin-port``. ``/metrics`` there
  gathers every process's metrics (from the workers' loopback admin
  listeners) and labels each sample ``worker="0"`` (the primary) …
  ``worker="N-1"``; ``sum without (worker)`` gives the pod's totals.
  ``/readyz`` is 503 while a worker is not running. Probes run in the
  primary only.
- **Limits per pod stay per pod.** Each process gets 1/N of every adapter's
  ``rate_limit``, ``rate_burst`` and ``max_in_flight`` (rounded up), and of
  ``--cache-size``, so the pod as a whole keeps to them. Circuit breakers,
  OAuth2 tokens and the in-memory response cache are per process.
- **One upstream fetch per key for the pod** (``ambassador.cache.peers``). Each
  cache key has an owner process; a miss for a key another process owns is
  asked of it over its UNIX socket, and the answer kept by both. The primary
  makes the sockets' directory (``tempfile.mkdtemp``, mode 0700), tells the
  workers in ``AMBASSADOR_PEER_DIR`` and removes it once all have stopped
  (a primary killed cannot: then the last worker to stop does).
- **Shutdown.** On SIGTERM the primary stops accepting, sends SIGTERM to each
  worker (each stops accepting and drains its requests within
  ``--grace-period``, like the primary) and exits 0 once all have. A worker
  whose primary is gone (its stdin closes) stops the same way; a worker that
  dies is started again after a second.
- **Logs.** Workers write to the primary's stdout and stderr; each line is one
  write (lines are flushed in whole-line chunks of at most PIPE_BUF bytes), so
  lines of different processes never mix. JSON lines carry ``"worker"``.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import sys

from attrs import evolve
from prometheus_client import CollectorRegistry, Metric
from prometheus_client.exposition import choose_encoder
from twisted.application.service import Service
from twisted.internet import defer, fdesc
from twisted.internet.abstract import FileDescriptor
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from zope.interface import implementer
from twisted.internet.interfaces import IStreamServerEndpoint

from ambassador.pipeline.client import UpstreamClient
from ambassador.exchange import UpstreamRequest
from ambassador.cache.peers import socket_path
from ambassador.pipeline.resilience import Policy

log = Logger(namespace="ambassador")

#: Set in a worker's environment: its index (1 … N-1). The primary is 0.
WORKER_VARIABLE = "AMBASSADOR_WORKER"
#: Set in a worker's environment: the directory of the processes' peer sockets (ambassador.cache.peers).
PEER_DIR_VARIABLE = "AMBASSADOR_PEER_DIR"
LISTEN_FD = 3  # in a worker: the proxy's listening socket
REPORT_FD = 4  # in a worker: where it writes its admin port, then closes
RESTART_DELAY = 1.0  # seconds before a worker that died is started again
_WORKER_MAIN = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


def worker_index(environ=os.environ) -> int:
    """This process's index: 0 for the primary (or a single ambassador), 1 … N-1 for a worker."""
    text = environ.get(WORKER_VARIABLE, "").strip()
    return int(text) if text.isdigit() else 0


def share_of(policy: Policy, workers: int) -> Policy:
    """One process's share of ``policy`` when ``workers`` processes serve together."""
    if workers <= 1:
        return policy
    max_in_flight = max(1, math.ceil(policy.max_in_flight / workers))
    if policy.rate_limit is None:
        return evolve(policy, max_in_flight=max_in_flight)
    return evolve(policy, max_in_flight=max_in_flight, rate_limit=policy.rate_limit / workers,
                  rate_burst=max(1, math.ceil(policy.burst / workers)))


@implementer(IStreamServerEndpoint)
class AdoptedEndpoint:
    """Listens on a listening socket inherited as file descriptor ``fd``."""

    def __init__(self, reactor, fd: int = LISTEN_FD) -> None:
        self._reactor = reactor
        self._fd = fd

    def listen(self, factory) -> defer.Deferred:
        try:
            probe = socket.socket(fileno=os.dup(self._fd))
            family = probe.family
            probe.detach()
            port = self._reactor.adoptStreamPort(self._fd, family, factory)  # takes a copy of the socket
            os.close(self._fd)
        except OSError as e:
            return defer.fail(e)
        return defer.succeed(port)

    def __str__(self) -> str:
        return f"the listening socket inherited as file descriptor {self._fd}"


_ONE_AT_A_TIME: dict[type, type] = {}


def accept_one_at_a_time(port) -> None:
    """Make ``port`` (a Twisted TCP or UNIX listening port) accept one connection each time it is ready.

    Twisted accepts up to 100 waiting connections at once (and learns to take
    more). With several processes on one socket, the process that happens to
    wake first would take a whole burst of new connections, a pool's worth,
    and serve them alone. Taking one at a time lets the others, woken for the
    same socket, take the rest: a busy process is not waiting, so the idle
    ones take more.
    """
    cls = type(port)
    if cls not in _ONE_AT_A_TIME:
        _ONE_AT_A_TIME[cls] = type(f"OneAtATime{cls.__name__}", (cls,),
                                   {"numberAccepts": property(lambda self: 1, lambda self, value: None)})
    port.__class__ = _ONE_AT_A_TIME[cls]


def report_admin_port(port: int, fd: int = REPORT_FD) -> None:
    """Tell the primary where this worker's admin listener is."""
    try:
        os.write(fd, b"%d\n" % port)
        os.close(fd)
    except OSError:
        pass  # not started by a primary (run by hand): nobody to tell


class ParentWatch(FileDescriptor):
    """Reads (and drops) what arrives on ``fd``; calls ``gone`` when it closes: the primary ended."""

    def __init__(self, reactor, gone, fd: int = 0) -> None:
        super().__init__(reactor)
        self._fd = fd
        self._gone = gone
        fdesc.setNonBlocking(fd)
        self.startReading()

    def fileno(self) -> int:
        return self._fd

    def doRead(self):
        return fdesc.readFromFD(self._fd, lambda data: None)

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        self._gone()


class _Worker(ProcessProtocol):
    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.admin_port: int | None = None
        self.ended: defer.Deferred = defer.Deferred()
        self._report = b""

    def connectionMade(self) -> None:
        assert self.transport is not None  # spawnProcess set it before this call
        log.info("Worker {index} started (pid {pid})", index=self.index, pid=self.transport.pid)

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == REPORT_FD:
            self._report += data
            if self._report.endswith(b"\n") and self._report.strip().isdigit():
                self.admin_port = int(self._report)

    def processEnded(self, reason) -> None:
        self.pool._ended(self, reason.value)
        self.ended.callback(None)


class WorkerPool(Service):
    """Starts, watches, restarts and stops the workers of a primary."""

    def __init__(self, reactor, count: int, args: list[str], listener, *, grace_period: float,
                 peer_dir: str | None = None) -> None:
        self._reactor = reactor
        self._peer_dir = peer_dir  # told to each worker
        self.count = count
        self._args = args
        self._listener = listener
        self._grace_period = grace_period
        self.workers: dict[int, _Worker] = {}
        self._client = UpstreamClient(reactor, max_idle_per_host=1, user_agent="ambassador-primary")
        self.setName("workers")

    def startService(self) -> None:
        super().startService()
        self._reactor.callWhenRunning(self._start_all)  # the listener is listening by then

    def _start_all(self) -> None:
        for index in range(1, self.count):
            self._start(index)

    def _start(self, index: int) -> None:
        if not self.running or self._listener.port is None:
            return
        worker = _Worker(self, index)
        self.workers[index] = worker
        argv = [sys.executable, "-c", _WORKER_MAIN, "--nodaemon", "--pidfile=", "ambassador", *self._args]
        env = {**os.environ, WORKER_VARIABLE: str(index)}
        if self._peer_dir is not None:
            env[PEER_DIR_VARIABLE] = self._peer_dir
        self._reactor.spawnProcess(worker, sys.executable, argv, env=env,
                                   childFDs={0: "w", 1: 1, 2: 2, LISTEN_FD: self._listener.port.fileno(),
                                             REPORT_FD: "r"})

    def _ended(self, worker: _Worker, status) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self.running:
            log.error("Worker {index} ended ({status}); starting it again in {delay:g} s", index=worker.index,
                      status=status, delay=RESTART_DELAY)
            self._reactor.callLater(RESTART_DELAY, self._start, worker.index)

    def missing(self) -> list[int]:
        """The workers not running (or not yet reporting) now."""
        return [i for i in range(1, self.count) if i not in self.workers or self.workers[i].admin_port is None]

    def stopService(self) -> defer.Deferred:
        super().stopService()
        running = list(self.workers.values())
        for worker in running:
            assert worker.transport is not None  # _start spawned it right after adding it
            worker.transport.signalProcess("TERM")
        waiting = defer.DeferredList([worker.ended for worker in running])
        kill = self._reactor.callLater(self._grace_period + 5, self._kill, running)
        waiting.addBoth(lambda _: kill.cancel() if kill.active() else None)
        waiting.addBoth(lambda _: self._client.close())
        return waiting

    @staticmethod
    def _kill(workers) -> None:
        for worker in workers:
            if not worker.ended.called:
                log.warn("Worker {index} did not stop in time; killing it", index=worker.index)
                try:
                    worker.transport.signalProcess("KILL")
                except Exception:
                    pass

    def gather_metrics(self, own: bytes, accept: str = "") -> defer.Deferred:
        """Every process's metrics in one exposition, each sample labelled with its worker; ``own`` and
        the result in the format ``accept`` asks for (``Metrics.exposition_for``), as each worker is asked."""
        asked = [(0, defer.succeed(own))]
        request = UpstreamRequest("GET", "/metrics", headers={"Accept": accept} if accept else {})
        for index, worker in sorted(self.workers.items()):
            if worker.admin_port is not None:
                call = self._client.fetch(f"http://127.0.0.1:{worker.admin_port}", request, max_body=16 * 1024 * 1024)
                call.addTimeout(5, self._reactor)
                call.addCallback(lambda response: response.body if response.status == 200 else b"")
                call.addErrback(lambda _: b"")  # a worker stopping or restarting: left out this time
                asked.append((index, call))
        gathered = defer.gatherResults([call for _, call in asked])
        gathered.addCallback(lambda texts: merge_expositions(zip([i for i, _ in asked], texts), accept))
        return gathered


class _Families:
    def __init__(self, families) -> None:
        self._families = families

    def collect(self):
        return self._families


def merge_expositions(expositions, accept: str = "") -> bytes:
    """(worker index, exposition) pairs as one exposition, with a ``worker`` label on every sample; each
    and the result in the format ``accept`` asks for (OpenMetrics or the Prometheus text format).

    Nothing is summed: a per-process value (``process_*``, ``python_*``, ``ambassador_build_info``) stays
    one series per worker, and ``sum without (worker)`` is for the counters that add up."""
    # Imported here: only a --workers primary parses expositions, and a single process need not hold the parsers.
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
    from prometheus_client.parser import text_string_to_metric_families as text_families

    encode, content_type = choose_encoder(accept)
    parse = openmetrics_families if content_type.startswith("application/openmetrics-text") else text_families
    families: dict[str, Metric] = {}
    for index, text in expositions:
        if not text:  # a worker that could not be asked
            continue
        for family in parse(text.decode("utf-8")):
            merged = families.setdefault(family.name, family)
            samples = [sample._replace(labels={**sample.labels, "worker": str(index)}) for sample in family.samples]
            if merged is family:
                family.samples = samples
            else:
                merged.samples.extend(samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return encode(registry)


def stop_when_primary_ends(reactor, peer_dir: str | None = None) -> ParentWatch:
    """In a worker: stop (gracefully, as on SIGTERM) when the primary's end of stdin closes."""

    def gone() -> None:
        if reactor.running:
            log.warn("The primary process ended; stopping")
            if peer_dir is not None:  # the primary cannot remove it now
                reactor.addSystemEventTrigger("after", "shutdown", _remove_peer_dir, peer_dir)
            os.kill(os.getpid(), signal.SIGTERM)

    return ParentWatch(reactor, gone)


def _remove_peer_dir(directory: str) -> None:
    """The peer sockets' directory, once the last worker has stopped: the primary's socket, left when
    it was killed, goes; the directory goes unless another worker's socket is still there (that
    worker then removes it)."""
    try:
        os.unlink(socket_path(directory, 0))
    except OSError:
        pass
    try:
        os.rmdir(directory)
    except OSError:
        pass
