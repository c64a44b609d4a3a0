"""Finding adapters: every IAdapterPlugin dropin in twisted/plugins, never a list in the core."""

from __future__ import annotations

from twisted.plugin import getPlugins

from .interfaces import IAdapterPlugin


def discover_adapters() -> list:
    import twisted.plugins

    return sorted(getPlugins(IAdapterPlugin, twisted.plugins), key=lambda plugin: plugin.name)
