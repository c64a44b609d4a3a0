"""Finding adapters: every IAdapterPlugin dropin in twisted/plugins, never a list in the core.

Adapters are found with Twisted's plugin system (``getPlugins``), in every
``twisted/plugins`` directory on ``sys.path`` and in the plugin directories
added with ``add_plugin_dirs``. Two habits of that system do not suit a
sidecar, so the ambassador's scan keeps them out of the log:

- a dropin that fails to import is logged as an "Unhandled Error" traceback
  on every scan: here it is returned as an ``ImportFailure`` instead, so the
  caller reports it once, in one line naming the module and the error;
- a ``dropin.cache`` that cannot be written (read-only root filesystem, a
  ConfigMap volume) is logged with an error number: here it is expected and
  silent (the dropins are simply imported again at the next start).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from collections.abc import Iterable, Iterator

import twisted.plugin
from attrs import frozen
from twisted.plugin import getCache, getPlugins
from twisted.python.modules import getModule

from ambassador.interfaces import ConfigurationError, IAdapterPlugin

#: Directories of dropin files to add to the scan, separated by os.pathsep (like PATH).
PLUGIN_DIRS_VARIABLE = "AMBASSADOR_PLUGIN_DIRS"


@frozen
class ImportFailure:
    """A dropin module that could not be imported: whatever adapter it provides is not served."""

    module: str
    error: str

    def __str__(self) -> str:
        return f"{self.module} ({self.error})"


@frozen
class Discovery:
    adapters: tuple  # IAdapterPlugin providers, sorted by name
    failures: tuple[ImportFailure, ...]

    def by_name(self) -> dict:
        return {plugin.name: plugin for plugin in self.adapters}


def plugin_dirs_from_environment(environ) -> list[str]:
    return [d for d in environ.get(PLUGIN_DIRS_VARIABLE, "").split(os.pathsep) if d.strip()]


#: The directories add_plugin_dirs added: their dropins are imported afresh by discover_adapters(fresh=True).
_ADDED_DIRS: list[str] = []


def add_plugin_dirs(dirs: Iterable[str]) -> None:
    """Scan the dropins in ``dirs`` too, as Twisted does for ``twisted/plugins`` on ``sys.path``."""
    import twisted.plugins

    for directory in dirs:
        path = os.path.abspath(directory.strip())
        if not os.path.isdir(path):
            raise ConfigurationError(f"plugin directory {directory} does not exist or is not a directory")
        if path not in twisted.plugins.__path__:
            twisted.plugins.__path__.append(path)
            _ADDED_DIRS.append(path)


def discover_adapters(*, fresh: bool = False) -> Discovery:
    """Every adapter plugin that can be loaded, and every dropin that could not. ``fresh`` (a reload):
    the dropins of the added plugin directories are imported again, so a changed file takes effect
    (installed dropins are not: a new version of a distribution needs a restart)."""
    import twisted.plugins

    if fresh:
        _forget_added_dropins()
    with _quiet_plugin_log():
        adapters = sorted(getPlugins(IAdapterPlugin, twisted.plugins), key=lambda plugin: plugin.name)
        cache = getCache(twisted.plugins)  # already scanned: only broken dropins are tried again
        modules = [m for m in getModule(twisted.plugins.__name__).iterModules() if _failed(m.name, cache)]
        failures = tuple(filter(None, map(_import_failure, modules)))
    return Discovery(tuple(adapters), failures)


def _forget_added_dropins() -> None:
    prefix = "twisted.plugins."
    for name, module in list(sys.modules.items()):
        where = getattr(module, "__file__", None) or ""
        if name.startswith(prefix) and any(os.path.dirname(where) == d for d in _ADDED_DIRS):
            del sys.modules[name]


def _failed(module: str, cache: dict) -> bool:
    """Not imported after a scan, and either never cached or cached as providing an adapter."""
    if module in sys.modules:
        return False
    entry = cache.get(module.rpartition(".")[2])
    return entry is None or any(IAdapterPlugin in plugin.provided for plugin in entry.plugins)


def _import_failure(module) -> ImportFailure | None:
    try:
        module.load()
    except Exception as e:
        return ImportFailure(module.name, f"{type(e).__name__}: {e}")
    return None


class _SilentLog:
    """Stands in for ``twisted.python.log`` inside ``twisted.plugin`` while the ambassador scans."""

    def err(self, *args, **kwargs) -> None:
        pass  # an import failure: discover_adapters finds it and returns it

    def msg(self, *args, **kwargs) -> None:
        pass  # "Unable to write to plugin cache": expected on a read-only filesystem


@contextmanager
def _quiet_plugin_log() -> Iterator[None]:
    original = twisted.plugin.log
    twisted.plugin.log = _SilentLog()  # type: ignore[assignment]  # a stand-in for the module: err and msg
    try:
        yield
    finally:
        twisted.plugin.log = original
