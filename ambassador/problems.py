"""The one error language: RFC 9457 problem details (``application/problem+json``)."""

from __future__ import annotations

import json
from collections.abc import Sequence

PROBLEM_CONTENT_TYPE = "application/problem+json"


class Problem(Exception):
    """An answer the ambassador gives itself, raised from anywhere in the request path.

    ``kind`` is a short slug documented in docs/problems.md; it becomes the
    ``type`` URI. ``detail`` must say what a person can do about it and must
    never contain a credential or an upstream URL.
    """

    def __init__(
        self,
        status: int,
        kind: str,
        title: str,
        detail: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        **extensions: object,
    ) -> None:
        super().__init__(f"{status} {kind}: {detail}")
        self.status = status
        self.kind = kind
        self.title = title
        self.detail = detail
        self.headers = tuple(headers)
        self.extensions = extensions

    def body(self, instance: str | None = None, request_id: str | None = None) -> bytes:
        document: dict[str, object] = {
            "type": f"urn:ambassador:problem:{self.kind}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance is not None:
            document["instance"] = instance
        if request_id is not None:
            document["request_id"] = request_id
        document.update(self.extensions)
        return json.dumps(document).encode()


def not_found(detail: str = "No route serves this path.") -> Problem:
    return Problem(404, "not-found", "Not found", detail)


def bad_gateway(kind: str, title: str, detail: str) -> Problem:
    return Problem(502, kind, title, detail)


def credential_rejected(adapter: str) -> Problem:
    return Problem(
        502,
        "credential-rejected",
        "Upstream rejected the credential",
        f"The {adapter} service rejected the credential configured in the ambassador. "
        "Check the key or token the ambassador was given; the caller cannot fix this.",
    )
