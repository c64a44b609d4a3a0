"""The response cache: freshness rules, stores, coalescing."""
