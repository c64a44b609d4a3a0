"""Adapters that ship with the ambassador (registered through twisted/plugins like any other)."""
