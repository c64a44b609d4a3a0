"""Serves ambassador.testing.FakeTMDB on the host's loopback for run.sh.

The key it accepts comes from FAKE_TMDB_API_KEY (not argv: ps would show it).
Prints its base URL as the first line, then serves until it is killed.
"""

import os

from twisted.internet import reactor

from ambassador.testing import FakeTMDB, serve

port = serve(FakeTMDB(api_keys={os.environ["FAKE_TMDB_API_KEY"]}))
print(port.base_url, flush=True)
reactor.run()
