"""Each adapter's namespace in shared state: ambassadors that share one Redis share only what they should.

Two ambassadors share an adapter's cache entries and rate limit only when they
serve the same adapter name, against the same base URL, with the same
credential. The credential takes part as its fingerprint (a PBKDF2 digest,
``ICredential.fingerprint``), never as itself; an adapter whose credential
offers no fingerprint is namespaced by name and base URL alone.
"""

from __future__ import annotations

import functools
import hashlib

from ambassador.interfaces import IExternalAdapter


def namespace(adapter: IExternalAdapter) -> str:
    """``<adapter name>:<16 hex digits>``, the same in every replica configured alike."""
    fingerprint = getattr(adapter.credential, "fingerprint", None)
    return _namespace(adapter.name, adapter.base_url, fingerprint() if fingerprint is not None else "")


@functools.lru_cache(maxsize=256)  # asked on every cached request and rate-limit token
def _namespace(name: str, base_url: str, fingerprint: str) -> str:
    digest = hashlib.sha256(f"{base_url}\0{fingerprint}".encode("utf-8", "surrogateescape")).hexdigest()
    return f"{name}:{digest[:16]}"


def redis_key(prefix: str, cache_key: str) -> bytes:
    """``<prefix><namespace>:<SHA-256 of cache_key>``: a Redis key for what belongs to one cache key
    (``ambassador.cache.responses.cache_key``, which starts with the adapter's namespace)."""
    namespace = cache_key.partition("\n")[0]
    return f"{prefix}{namespace}:{hashlib.sha256(cache_key.encode()).hexdigest()}".encode()
