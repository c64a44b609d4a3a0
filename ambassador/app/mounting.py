"""Which adapters are served, and where: ``--adapter`` selects them, ``--mount`` moves their routes.

``--mount NAME=/path`` moves adapter NAME's main route (its first; for
TMDB the ``/tmdb`` passthrough), ``--mount NAME.ROUTE=/path`` moves the
route called ROUTE (``tmdb.movies=/films``). Moving makes new ``Route``
values; the adapter itself is not touched (``Remounted`` serves it with
them), so an adapter needs nothing to be movable.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from attrs import evolve, frozen
from twisted.python.components import proxyForInterface

from ambassador.adapters.http import HTTPAdapter
from ambassador.app.discovery import Discovery
from ambassador.exchange import Route
from ambassador.interfaces import ConfigurationError, IExternalAdapter

_MOUNT_PATH = re.compile(r"(/[A-Za-z0-9_.,:~-]+)+/?\Z")


@frozen
class Mount:
    adapter: str
    route: str | None  # None: the adapter's main route
    path: str

    @classmethod
    def parse(cls, text: str) -> Mount:
        name, _, path = text.partition("=")
        adapter, _, route = name.strip().partition(".")
        if not adapter or not _MOUNT_PATH.match(path) or {".", ".."} & set(path.split("/")):
            raise ConfigurationError(
                "--mount: expected NAME=/path or NAME.ROUTE=/path, the path made of "
                "/-separated segments of letters, digits and _ . , : ~ -"
            )
        return cls(adapter, route or None, path.rstrip("/"))

    def __str__(self) -> str:
        return f"{self.adapter}{'.' + self.route if self.route else ''}={self.path}"


def select_adapters(discovery: Discovery, names: Sequence[str]) -> list:
    """The plugins called ``names`` (every one when empty); an unknown name is an error."""
    known = discovery.by_name()
    if not names:
        return list(known.values())
    unknown = [name for name in names if name not in known]
    if unknown:
        message = "--adapter: not the name of a known adapter; known adapters: " + (
            ", ".join(known) or "none"
        )
        if discovery.failures:
            message += "; these dropins failed to import: " + "; ".join(map(str, discovery.failures))
        raise ConfigurationError(message)
    return [known[name] for name in dict.fromkeys(names)]


def moved_routes(adapter: str, routes: Sequence[Route], mounts: Sequence[Mount]) -> tuple[Route, ...]:
    """``routes`` of ``adapter`` with the paths its ``mounts`` give them."""
    moved = list(routes)
    for mount in mounts:
        if mount.adapter != adapter:
            continue
        names = [route.name for route in moved]
        if mount.route is None and moved:
            index = 0
        elif mount.route in names:
            index = names.index(mount.route)
        else:
            raise ConfigurationError(f"--mount: {adapter} has no route of the name given; "
                                     f"its routes: {', '.join(names) or 'none'}")
        moved[index] = evolve(moved[index], path=mount.path)
    return tuple(moved)


def check_mount_names(mounts: Sequence[Mount], adapters: Sequence[str]) -> None:
    for mount in mounts:
        if mount.adapter not in adapters:
            raise ConfigurationError(
                f"--mount: names an adapter that is not served; served: {', '.join(adapters) or 'none'}"
            )


class Remounted(proxyForInterface(IExternalAdapter, "adapter")):  # type: ignore[misc]
    """An adapter served at other paths: everything but ``routes`` is the original's."""

    def __init__(self, adapter: IExternalAdapter, routes: tuple[Route, ...]) -> None:
        super().__init__(adapter)
        self._routes = routes

    @property
    def routes(self) -> tuple[Route, ...]:
        return self._routes


def mounted(adapter: IExternalAdapter, mounts: Sequence[Mount]) -> IExternalAdapter:
    routes = moved_routes(adapter.name, adapter.routes, mounts)
    return adapter if routes == tuple(adapter.routes) else Remounted(adapter, routes)


def describe_adapters(discovery: Discovery, mounts: Sequence[Mount], environ) -> str:
    """The --list-adapters text: each adapter's routes, description and settings (set or not, never values)."""
    lines = []
    for plugin in discovery.adapters:
        lines += [f"{plugin.name}: {plugin.description}",
                  f"  mounted at: {_routes(moved_routes(plugin.name, plugin.routes, mounts))}"]
        for setting in plugin.settings:
            state = "set" if environ.get(setting.name, "").strip() else "not set"
            lines.append(f"  {setting.name:30} {state:8} {setting.help}")
    if not discovery.adapters:
        lines.append("No adapters found.")
    return "\n".join(lines + _failures(discovery)) + "\n"


def describe_configured(adapters: Sequence[IExternalAdapter], discovery: Discovery, config: str) -> str:
    """The --list-adapters text with --config: what the file serves, and whether each has its credential."""
    descriptions = {plugin.name: plugin.description for plugin in discovery.adapters}
    lines = [f"Served from {config}:"]
    for adapter in adapters:
        inner = adapter
        while hasattr(inner, "adapter"):  # through a remount and a config file entry, to the plugin's adapter
            inner = inner.adapter
        description = "an HTTP API (type http)" if isinstance(inner, HTTPAdapter) else descriptions[inner.name]
        credential = adapter.credential
        state = "set" if credential.present() else f"missing: {credential.missing_reason(adapter.name)}"
        lines += [f"{adapter.name}: {description}", f"  mounted at: {_routes(adapter.routes)}",
                  f"  credential: {state}"]
    if not adapters:
        lines.append("No adapters.")
    others = sorted(set(descriptions) - {adapter.name for adapter in adapters})
    if others:
        lines.append(f"Found but not in {config}: {', '.join(others)}")
    return "\n".join(lines + _failures(discovery)) + "\n"


def _routes(routes: Sequence[Route]) -> str:
    return ", ".join(f"{route.path}{'/…' if route.prefix else ''} ({route.name})" for route in routes)


def _failures(discovery: Discovery) -> list[str]:
    return [f"Dropin {failure.module} failed to import ({failure.error}); any adapter it provides is not served"
            for failure in discovery.failures]
