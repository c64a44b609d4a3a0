"""Secret sources, how credentials are attached, OAuth2."""
