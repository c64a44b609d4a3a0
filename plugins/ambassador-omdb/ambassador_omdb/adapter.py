"""OMDb, The Open Movie Database: ``GET /omdb?t=…``, ``?i=…`` or ``?s=…`` with the API key added.

OMDb answers most errors with HTTP 200 and ``{"Response": "False", "Error": "…"}``.
This adapter reads that text and answers with the status it means, in the
ambassador's problem+json shape; a successful answer is passed on unchanged.
"""

from __future__ import annotations

from attrs import frozen
from twisted.plugin import IPlugin
from zope.interface import implementer

from ambassador.adapter import (
    Answer,
    Credential,
    IAdapterPlugin,
    IExternalAdapter,
    InboundRequest,
    Problem,
    Route,
    Setting,
    UpstreamRequest,
    UpstreamResponse,
    as_query_parameter,
    bad_answer,
    base_url_from_environment,
    credential_rejected,
    forward,
    not_found,
    outside_failure,
    parse_json_object,
    retry_after,
    secret_from_environment,
)

DEFAULT_BASE_URL = "https://www.omdbapi.com"
ROUTE = Route("omdb", "/omdb")
#: The caller's query parameters sent on; everything else (apikey, r=xml, callback) stays behind.
FORWARDED_PARAMS = frozenset({"t", "i", "s", "y", "type", "plot", "page"})
#: OMDb's limit is per day and it does not say when it resets: callers are told to retry in an hour.
QUOTA_RETRY_AFTER = "3600"

# OMDb's error texts, by what they mean.
NOT_FOUND = frozenset({"Movie not found!", "Series not found!", "Episode not found!", "Series or episode not found!"})
CALLER_MISTAKES = frozenset({
    "Incorrect IMDb ID.",  # also what OMDb says when none of t, i, s was given
    "Too many results.",  # a search term too short
    "The offset specified in a OFFSET clause may not be negative.",  # page below 1
})
REJECTED_KEY = frozenset({"Invalid API key!", "No API key provided."})
QUOTA_EXHAUSTED = "Request limit reached!"

_MISSING_HINT = "Set OMDB_API_KEY, or OMDB_API_KEY_FILE to a mounted Secret file."


@implementer(IExternalAdapter)
@frozen
class OMDbAdapter:
    credential: Credential
    base_url: str = DEFAULT_BASE_URL
    name: str = "omdb"
    routes: tuple[Route, ...] = (ROUTE,)
    secret_params: frozenset[str] = frozenset({"apikey"})

    def upstream_request(self, inbound: InboundRequest) -> UpstreamRequest:
        # HEAD is sent as GET so the answer can be checked (the ambassador drops it for the caller).
        return UpstreamRequest("GET", "/", tuple((k, v) for k, v in inbound.query if k in FORWARDED_PARAMS))

    def interpret(self, inbound: InboundRequest, response: UpstreamResponse) -> Answer:
        failure = outside_failure("OMDb", response)
        if failure is not None:
            raise failure
        document = parse_json_object(response)
        if document is None:
            raise bad_answer("OMDb", f"status {response.status} with a body that is not a JSON object")
        if document.get("Response") == "False":
            raise self._problem(str(document.get("Error", "")), response)
        if response.status != 200 or document.get("Response") != "True":
            raise bad_answer("OMDb", f"status {response.status} without \"Response\": \"True\"")
        return forward(response)

    def _problem(self, error: str, response: UpstreamResponse) -> Problem:
        if error in NOT_FOUND:
            return not_found(f"OMDb: {error}")
        if error in CALLER_MISTAKES:
            return Problem(400, "bad-request", "The outside service refused the request", f"OMDb: {error}")
        if error in REJECTED_KEY:
            return credential_rejected("OMDb")
        if error == QUOTA_EXHAUSTED:
            return Problem(503, "upstream-quota-exhausted", "Upstream request quota used up",
                           f"OMDb: {error} The API key's daily quota is used up; retry later.",
                           headers=retry_after(response, QUOTA_RETRY_AFTER))
        text = self.credential.redact(error)[:200]
        return Problem(502, "upstream-error", "Upstream error", f"OMDb answered an error the ambassador does not "
                       f"know: {text!r}")


@implementer(IPlugin, IAdapterPlugin)
@frozen
class OMDbPlugin:
    name: str = "omdb"
    description: str = "The Open Movie Database: /omdb?t=title, ?i=IMDb id or ?s=search"
    routes: tuple[Route, ...] = (ROUTE,)
    settings: tuple[Setting, ...] = (
        Setting("OMDB_API_KEY", "OMDb API key, sent as the apikey query parameter", secret=True),
        Setting("OMDB_API_KEY_FILE", "file holding the OMDb API key (a mounted Secret), re-read when it changes"),
        Setting("OMDB_BASE_URL", f"where OMDb is (default {DEFAULT_BASE_URL})"),
    )

    def configure(self, environ, reactor) -> OMDbAdapter:
        key = secret_from_environment(environ, "OMDB_API_KEY")
        return OMDbAdapter(
            credential=Credential(key, as_query_parameter("apikey"), _MISSING_HINT),
            base_url=base_url_from_environment(environ, "OMDB_BASE_URL", DEFAULT_BASE_URL),
        )
