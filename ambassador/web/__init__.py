"""The proxy port: Site, Resource tree, limits, admin Resources."""
