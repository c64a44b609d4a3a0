# Registers the built-in TMDB adapter exactly as a third-party adapter registers itself.
from ambassador.adapters.tmdb import TMDBPlugin

tmdb = TMDBPlugin()
