"""The Movie Database (TMDB) v3 API: ``/movies`` and a credential-injecting ``/tmdb/3/`` passthrough."""

from __future__ import annotations

from typing import ClassVar

from attrs import frozen
from twisted.plugin import IPlugin
from zope.interface import implementer

from ambassador.adapter import (
    DEFAULT_MAX_RESPONSE_BYTES,
    Egress,
    Answer,
    Credential,
    IAdapterPlugin,
    IExternalAdapter,
    InboundRequest,
    Route,
    Setting,
    UpstreamRequest,
    UpstreamResponse,
    as_bearer_token,
    as_query_parameter,
    bad_answer,
    base_url_from_environment,
    credential_rejected,
    forward,
    is_json_type,
    looks_like_json,
    not_found,
    outside_failure,
    parse_json_object,
    secret_from_environment,
    without_params,
)

DEFAULT_BASE_URL = "https://api.themoviedb.org"
MOVIES = Route("movies", "/movies")
PASSTHROUGH = Route("tmdb-v3", "/tmdb", prefix=True)
ROUTES = (PASSTHROUGH, MOVIES)  # the passthrough is the main one: --mount tmdb=/path moves it

# TMDB's status_code values that mean "your credential is no good":
# 3 authentication failed, 7 invalid API key, 10 suspended API key.
_REJECTED_CREDENTIAL_CODES = frozenset({3, 7, 10})
_SECRET_PARAMS = frozenset({"api_key"})
_MISSING_HINT = (
    "Set TMDB_READ_ACCESS_TOKEN or TMDB_API_KEY, or TMDB_READ_ACCESS_TOKEN_FILE / "
    "TMDB_API_KEY_FILE to a mounted Secret file."
)


@implementer(IExternalAdapter)
@frozen
class TMDBAdapter:
    credential: Credential
    base_url: str = DEFAULT_BASE_URL
    name: str = "tmdb"
    routes: tuple[Route, ...] = ROUTES
    secret_params: frozenset[str] = _SECRET_PARAMS
    max_response_bytes: ClassVar[int] = DEFAULT_MAX_RESPONSE_BYTES
    # gzip makes a discover page a third of its size and a movie's details half, for ~20 µs of decoding
    # per upstream answer (bench/gzip_tmdb.py, bench/RESULTS.md); only misses of the cache pay it.
    accept_encoding: ClassVar[str] = "gzip"
    probe_path: str = "/3/configuration"  # small, and answers 401 when the credential is bad
    # TMDB answers 429 (status_code 25) above roughly 40 requests per second. Its data changes
    # slowly: a five-minute-old answer serves a caller better than an outage does.
    policy_defaults: tuple[tuple[str, str], ...] = (("rate_limit", "40"), ("rate_burst", "40"),
                                                    ("stale_if_error", "300"))
    propagate_trace: bool = False  # an outside service: the caller's trace ends at the ambassador
    egress: Egress | None = None  # the process's (a config file entry's proxy:, ca_file: … replace it)

    def upstream_request(self, inbound: InboundRequest) -> UpstreamRequest:
        if inbound.route.name == MOVIES.name:
            path = "/3/discover/movie"
        elif len(inbound.segments) >= 2 and inbound.segments[0] == "3":
            path = "/3/" + "/".join(inbound.segments[1:])
        else:
            raise not_found(f"TMDB paths below {inbound.route.path} look like {inbound.route.path}/3/movie/550.")
        # HEAD is sent as GET so the answer can be checked (the ambassador drops it for the caller).
        return UpstreamRequest("GET", path, without_params(inbound.query, _SECRET_PARAMS))

    def interpret(self, inbound: InboundRequest, response: UpstreamResponse) -> Answer:
        failure = outside_failure("TMDB", response)
        if failure is not None:
            raise failure
        if not is_json_type(response):
            raise bad_answer("TMDB", f"status {response.status} with content type {response.content_type!r}, not JSON")
        if response.status < 300:
            if not looks_like_json(response.body):
                raise bad_answer("TMDB", "a body that is not JSON")
            return forward(response)
        error = parse_json_object(response)
        if error is None:
            raise bad_answer("TMDB", f"status {response.status} with a body that is not JSON")
        if response.status == 401 and error.get("status_code") in _REJECTED_CREDENTIAL_CODES:
            raise credential_rejected("TMDB")
        return forward(response)  # the caller's mistake (404 code 34, 422 …): theirs to see


@implementer(IPlugin, IAdapterPlugin)
@frozen
class TMDBPlugin:
    name: str = "tmdb"
    description: str = "The Movie Database v3 API: /movies (discover) and /tmdb/3/… passthrough"
    routes: tuple[Route, ...] = ROUTES
    settings: tuple[Setting, ...] = (
        Setting("TMDB_READ_ACCESS_TOKEN", "v4 read access token, sent as Authorization: Bearer "
                "(preferred: keeps the key out of URLs)", secret=True),
        Setting("TMDB_READ_ACCESS_TOKEN_FILE", "file holding the read access token (a mounted Secret), "
                "re-read when it changes"),
        Setting("TMDB_API_KEY", "v3 API key, sent as the api_key query parameter", secret=True),
        Setting("TMDB_API_KEY_FILE", "file holding the v3 API key, re-read when it changes"),
        Setting("API_KEY", "accepted for TMDB_API_KEY when that is unset", secret=True),
        Setting("TMDB_BASE_URL", f"where TMDB is (default {DEFAULT_BASE_URL})"),
    )

    def configure(self, environ, reactor) -> TMDBAdapter:
        token = secret_from_environment(environ, "TMDB_READ_ACCESS_TOKEN")
        key = secret_from_environment(environ, "TMDB_API_KEY") or secret_from_environment(
            environ, "API_KEY", allow_file=False
        )
        if token is not None:
            credential = Credential(token, as_bearer_token(), _MISSING_HINT)
        else:
            credential = Credential(key, as_query_parameter("api_key"), _MISSING_HINT)
        return TMDBAdapter(
            credential=credential,
            base_url=base_url_from_environment(environ, "TMDB_BASE_URL", DEFAULT_BASE_URL),
        )
