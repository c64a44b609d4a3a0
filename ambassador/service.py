"""``twistd ambassador``: command-line options and the service that serves the adapters."""

from __future__ import annotations

import ipaddress
import os
import signal

from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from .discovery import PLUGIN_DIRS_VARIABLE, add_plugin_dirs, discover_adapters, plugin_dirs_from_environment
from .interfaces import ConfigurationError
from .mounting import Mount, check_mount_names, describe_adapters, mounted, select_adapters
from .upstream import Gateway, UpstreamClient
from .web import AmbassadorSite, build_root, mount_table

log = Logger(namespace="ambassador")


def endpoint_description(port: str) -> str:
    """A bare port number means TCP on loopback only: the ambassador holds credentials."""
    port = port.strip()
    if port.isdigit():
        return f"tcp:{port}:interface=127.0.0.1"
    return port


class Options(usage.Options):
    synopsis = "[options]"
    optFlags = [
        ["list-adapters", None,
         "Print every discovered adapter (name, paths, description, the environment variables it reads "
         "and whether each is set, never its value) and exit."],
    ]
    optParameters = [
        ["port", "p", "8080",
         "Where to serve the main container: a bare number is TCP on 127.0.0.1 only; "
         "otherwise an endpoint description such as tcp:8080:interface=0.0.0.0 or unix:/run/amb.sock."],
        ["timeout", "t", 10.0,
         "Seconds one upstream exchange (connect, send, whole answer) may take before the caller gets 504.",
         float],
        ["connect-timeout", None, 3.0, "Seconds to wait for a connection to an outside service.", float],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["adapter"] = []
        self["mount"] = []
        self["plugin-dir"] = []

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
        self["plugin-dir"].append(directory)

    def getUsage(self, width=None) -> str:
        lines = ["", "Environment variables (values are never printed):",
                 f"  {PLUGIN_DIRS_VARIABLE:32} directories of adapter dropins, separated by '{os.pathsep}' "
                 "(like --plugin-dir)"]
        for plugin in discover_adapters().adapters:
            lines.append(f"  {plugin.name}: {plugin.description}")
            for setting in plugin.settings:
                lines.append(f"    {setting.name:30} {setting.help}")
        return super().getUsage(width) + "\n".join(lines) + "\n"

    def postOptions(self) -> None:
        from twisted.internet import reactor

        for name in ("timeout", "connect-timeout"):
            if not self[name] > 0:
                raise usage.UsageError(f"--{name} must be a positive number of seconds")
        self["endpoint"] = endpoint_description(self["port"])
        try:
            add_plugin_dirs(plugin_dirs_from_environment(os.environ) + self["plugin-dir"])
            discovery = discover_adapters()
            plugins = select_adapters(discovery, self["adapter"])
            check_mount_names(self["mount"], [plugin.name for plugin in plugins])
            if self["list-adapters"]:
                print(describe_adapters(discovery, self["mount"], os.environ), end="")
                raise SystemExit(0)
            adapters = [mounted(plugin.configure(os.environ, reactor), self["mount"]) for plugin in plugins]
            mount_table(adapters)
        except ConfigurationError as e:
            raise usage.UsageError(str(e))
        for failure in discovery.failures:
            log.error("Adapter dropin {module} failed to import ({error}); the adapters it provides are not "
                      "served", module=failure.module, error=failure.error)
        self["adapters"] = adapters


class ProxyService(Service):
    """Listens on the proxy endpoint and owns what the adapters need while serving."""

    def __init__(self, reactor, endpoint: str, adapters, client: UpstreamClient, gateway: Gateway) -> None:
        self._reactor = reactor
        self._endpoint = endpoint
        self._adapters = adapters
        self._client = client
        self.site = AmbassadorSite(build_root(adapters, gateway), reactor)
        self.port = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        listening = serverFromString(self._reactor, self._endpoint).listen(self.site)
        listening.addCallbacks(self._listening, self._cannot_listen)

    def _listening(self, port) -> None:
        self.port = port
        # Announce once the reactor runs: then signals are handled and requests served.
        self._reactor.callWhenRunning(self._announce)

    def _announce(self) -> None:
        address = self.port.getHost()
        host = getattr(address, "host", None)
        where = f"{host}:{address.port}" if host is not None else getattr(address, "name", str(address))
        routes = ", ".join(f"{route.path} ({adapter.name})" for adapter in self._adapters for route in adapter.routes)
        log.info("ambassador listening on {address}; routes: {routes}", address=where, routes=routes)
        if host is not None and not ipaddress.ip_address(host.split("%")[0]).is_loopback:
            log.warn(
                "Listening on {address}, which is not loopback: anyone who reaches this address can use "
                "the ambassador's credentials. Bind 127.0.0.1 unless the pod's network is trusted.",
                address=where,
            )

    def _cannot_listen(self, failure) -> None:
        log.critical("Cannot listen on {endpoint}: {error}", endpoint=self._endpoint, error=failure.getErrorMessage())
        raise SystemExit(1)

    def startService(self) -> None:
        super().startService()
        for adapter in self._adapters:
            adapter.credential.start(self._reactor)

    def stopService(self):
        super().stopService()
        if getattr(self._reactor, "_exitSignal", None) == signal.SIGTERM:
            # SIGTERM is how Kubernetes asks a pod to stop: a clean stop exits 0
            # (twistd would otherwise re-raise the signal and die by it).
            self._reactor._exitSignal = None
        for adapter in self._adapters:
            adapter.credential.stop()
        stopped = self.port.stopListening() if self.port is not None else None
        self._client.close()
        return stopped


def makeService(options: Options) -> MultiService:
    from twisted.internet import reactor

    client = UpstreamClient(reactor, connect_timeout=options["connect-timeout"])
    gateway = Gateway(client, reactor, timeout=options["timeout"])
    service = MultiService()
    ProxyService(reactor, options["endpoint"], options["adapters"], client, gateway).setServiceParent(service)
    return service
