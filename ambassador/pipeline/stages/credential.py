"""The credential: attached to each attempt, and refreshed once per exchange after a 401 it can explain.

Attaching may wait (an OAuth2 source fetching a token). A 401 to a
credential that can be refreshed is sent once more with a fresh one, apart
from (and before) the retry policy.
"""

from __future__ import annotations

from attrs import define

from ambassador.exchange import UpstreamResponse
from ambassador.pipeline.stages import Call, Stage


@define
class Credential:
    next: Stage

    async def __call__(self, call: Call) -> UpstreamResponse:
        adapter = call.adapter
        sent = await adapter.credential.attach(call.request, adapter.name)
        response = await self.next(call.with_request(sent))
        if response.status == 401 and not call.refreshed and adapter.credential.rejected(sent):
            call.refreshed = True
            return await self(call)
        return response
