"""A fake OMDb for tests: a real twisted.web server (serve it with ``ambassador.testing.serve``)."""

from __future__ import annotations

import json
import re

from attrs import define, field

from ambassador.testing import FakeService, RecordedRequest

MOVIES = [
    {"Title": "The Matrix", "Year": "1999", "Rated": "R", "Genre": "Action, Sci-Fi", "imdbID": "tt0133093",
     "Type": "movie", "Plot": "When a beautiful stranger leads computer hacker Neo to a forbidding underworld ..."},
    {"Title": "The Matrix Reloaded", "Year": "2003", "Rated": "R", "Genre": "Action, Sci-Fi",
     "imdbID": "tt0234215", "Type": "movie", "Plot": "Freedom fighters Neo, Trinity and Morpheus continue ..."},
    {"Title": "Breaking Bad", "Year": "2008–2013", "Rated": "TV-MA", "Genre": "Crime, Drama", "imdbID": "tt0903747",
     "Type": "series", "Plot": "A chemistry teacher diagnosed with inoperable lung cancer ..."},
]


def omdb_error(text: str) -> dict:
    return {"Response": "False", "Error": text}


@define
class FakeOMDb(FakeService):
    """An OMDb look-alike that fails the way OMDb does: HTTP 200 with ``{"Response": "False", "Error": …}``
    for the caller's mistakes, 401 for a missing or wrong key and for a used-up quota.

    Set ``quota_used_up`` to answer as when the key's daily limit is reached,
    or ``error`` to answer every request with that error text (HTTP 200).
    """

    api_keys: set[str] = field(factory=lambda: {"test-omdb-key"})
    quota_used_up: bool = False
    error: str | None = None

    def render(self, request):
        recorded = self.record(request)
        key = recorded.param("apikey")
        if not key:
            return self._json(request, 401, omdb_error("No API key provided."))
        if key not in self.api_keys:
            return self._json(request, 401, omdb_error("Invalid API key!"))
        if self.quota_used_up:
            return self._json(request, 401, omdb_error("Request limit reached!"))
        if self.error is not None:
            return self._json(request, 200, omdb_error(self.error))
        return self._json(request, 200, self._lookup(recorded))

    def _lookup(self, recorded: RecordedRequest) -> dict:
        kind = recorded.param("type")
        candidates = [m for m in MOVIES if kind in (None, "", m["Type"])]
        missing = omdb_error("Series not found!" if kind == "series" else "Movie not found!")
        if recorded.param("i") is not None:
            found = [m for m in MOVIES if m["imdbID"] == recorded.param("i")]
            # OMDb says the same for an ID that is malformed and one it does not know.
            return {**found[0], "Response": "True"} if found else omdb_error("Incorrect IMDb ID.")
        if recorded.param("t") is not None:
            title = recorded.param("t").lower()
            return next(({**m, "Response": "True"} for m in candidates if m["Title"].lower() == title), missing)
        if recorded.param("s") is not None:
            text, page = recorded.param("s").lower(), recorded.param("page") or "1"
            if len(text) < 3:
                return omdb_error("Too many results.")
            if not re.fullmatch(r"-?\d+", page) or int(page) < 1:
                return omdb_error("The offset specified in a OFFSET clause may not be negative.")
            found = [m for m in candidates if text in m["Title"].lower()] if page == "1" else []
            if not found:
                return missing
            short = [{k: m[k] for k in ("Title", "Year", "imdbID", "Type")} for m in found]
            return {"Search": short, "totalResults": str(len(found)), "Response": "True"}
        return omdb_error("Incorrect IMDb ID.")  # none of i, t, s

    def _json(self, request, status: int, document: dict) -> bytes:
        request.setResponseCode(status)
        request.setHeader("Content-Type", "application/json; charset=utf-8")
        request.setHeader("Cache-Control", "public, max-age=86400")
        request.setHeader("Access-Control-Allow-Origin", "*")
        return json.dumps(document).encode()
