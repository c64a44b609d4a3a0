"""ambassador.testing's fakes: in memory through treq.testing.StubTreq, and held answers for a caller who left."""

import json

import pytest_twisted
import treq
from treq.testing import StubTreq

from ambassador.testing import FakeAPI, FakeTMDB, serving
from conftest import reactor_turns_until


@pytest_twisted.ensureDeferred
async def test_a_fake_answers_in_memory_through_stubtreq():
    fake = FakeTMDB()
    client = StubTreq(fake)
    response = await client.get("http://tmdb.test/3/movie/550?api_key=test-api-key")
    assert response.code == 200
    assert json.loads(await client.content(response))["title"] == "Fight Club"
    response = await client.get("http://tmdb.test/3/movie/550?api_key=wrong")
    assert response.code == 401
    assert [(seen.path, seen.param("api_key")) for seen in fake.requests] == [
        ("/3/movie/550", "test-api-key"), ("/3/movie/550", "wrong")]


@pytest_twisted.ensureDeferred
async def test_fake_api_checks_the_credential_in_memory():
    fake = FakeAPI(accept=lambda seen: seen.headers.get("authorization") == "Bearer good")
    client = StubTreq(fake)
    refused = await client.post("http://api.test/v1/things", b"{}", headers={"Authorization": "Bearer bad"})
    accepted = await client.post("http://api.test/v1/things", b"{}", headers={"Authorization": "Bearer good"})
    assert (refused.code, accepted.code) == (401, 200)
    assert json.loads(await client.content(accepted)) == {"method": "POST", "path": "/v1/things", "body": "{}"}


@pytest_twisted.ensureDeferred
async def test_a_held_request_whose_caller_left_is_not_answered_on_release():
    with serving(FakeTMDB(fault="hang")) as fake:
        gone = treq.get(fake.base_url + "/3/movie/550?api_key=test-api-key", persistent=False)
        await reactor_turns_until(lambda: fake.hanging)
        [left] = fake.hanging
        assert fake.connected(left)
        gone.cancel()
        gone.addErrback(lambda _: None)
        await reactor_turns_until(lambda: not fake.connected(left))

        staying = treq.get(fake.base_url + "/3/movie/603?api_key=test-api-key", persistent=False)
        await reactor_turns_until(lambda: len(fake.hanging) == 2)
        fake.release()  # answers the one still there; writing to the one that left would raise
        response = await staying
        assert response.code == 200
        assert fake.hanging == []
