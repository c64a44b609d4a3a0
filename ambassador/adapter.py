"""Everything an adapter is written with: the one module adapter authors import from.

This is the ambassador's stable surface for adapters. The names in ``__all__``
keep their meaning from release to release; the modules they come from
(``ambassador.exchange``, ``ambassador.pipeline.answers``, ``ambassador.credentials``, …)
are the ambassador's own and may move. An adapter imports from here, and its
tests from ``ambassador.testing``; docs/writing-an-adapter.md shows both.

- What an adapter provides: ``IAdapterPlugin`` (discovered, describes and builds
  the adapter, listing its ``Setting``s) and ``IExternalAdapter`` (serves);
  ``ConfigurationError`` from ``configure`` stops startup with its message.
- What passes through it: ``Route``, ``InboundRequest``, ``UpstreamRequest``,
  ``UpstreamResponse``, ``Answer``; ``without_params`` drops query parameters.
- Credentials (``ICredential``): ``secret_from_environment`` reads ``VAR`` or the
  file named by ``VAR_FILE``; ``Credential`` attaches it ``as_query_parameter``,
  ``as_header``, ``as_bearer_token`` or ``as_basic`` (a ``BasicPair``);
  ``OAuth2ClientCredentials`` fetches a token first.
- ``base_url_from_environment`` reads and checks a ``scheme://host[:port][/prefix]`` setting.
- Answers: ``forward``, ``outside_failure``, ``parse_json_object``, ``is_json_type``,
  ``looks_like_json``, ``retry_after``; problems the caller gets: ``Problem``,
  ``bad_answer``, ``credential_rejected``, ``not_found``, ``bad_gateway``.
- ``DEFAULT_MAX_RESPONSE_BYTES``: the longest upstream answer read when an adapter sets no
  ``max_response_bytes``.
"""

from __future__ import annotations

from ambassador.app.base_urls import base_url_from_environment
from ambassador.credentials.sources import (
    BasicPair,
    Credential,
    Injector,
    OAuth2ClientCredentials,
    SecretSource,
    as_basic,
    as_bearer_token,
    as_header,
    as_query_parameter,
    secret_from_environment,
)
from ambassador.exchange import Answer, InboundRequest, Query, Route, UpstreamRequest, UpstreamResponse, without_params
from ambassador.interfaces import ConfigurationError, IAdapterPlugin, ICredential, IExternalAdapter, Setting
from ambassador.pipeline.client import DEFAULT_MAX_RESPONSE_BYTES
from ambassador.pipeline.answers import (
    PASSED_RESPONSE_HEADERS,
    bad_answer,
    forward,
    is_json_type,
    looks_like_json,
    outside_failure,
    parse_json_object,
    retry_after,
)
from ambassador.problems import PROBLEM_CONTENT_TYPE, Problem, bad_gateway, credential_rejected, not_found

__all__ = [
    # the interfaces
    "IAdapterPlugin",
    "IExternalAdapter",
    "ICredential",
    "Setting",
    "ConfigurationError",
    # what passes through an adapter
    "Route",
    "InboundRequest",
    "UpstreamRequest",
    "UpstreamResponse",
    "Answer",
    "Query",
    "without_params",
    # credentials
    "Credential",
    "OAuth2ClientCredentials",
    "BasicPair",
    "SecretSource",
    "Injector",
    "secret_from_environment",
    "as_query_parameter",
    "as_header",
    "as_bearer_token",
    "as_basic",
    # settings
    "base_url_from_environment",
    # answers
    "PASSED_RESPONSE_HEADERS",
    "forward",
    "outside_failure",
    "parse_json_object",
    "is_json_type",
    "looks_like_json",
    "retry_after",
    "DEFAULT_MAX_RESPONSE_BYTES",
    # problems
    "Problem",
    "PROBLEM_CONTENT_TYPE",
    "bad_answer",
    "bad_gateway",
    "credential_rejected",
    "not_found",
]
