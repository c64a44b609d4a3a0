"""State shared by every replica through Redis: the rate limit and its back-off, under each adapter's namespace."""
