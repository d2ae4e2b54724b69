"""Idempotency-Key: a retried POST (or WebSocket generate) with the same key and body is the first
request, never a second one; the same key with another body is a 422; keys expire with the results."""

from __future__ import annotations

import asyncio
import json

from common import api_keys, keys
from common.api_keys import ApiKey
from tests.conftest import TEST_MODEL, StartFleet
from tests.test_faults import echo

BODY = {"model": TEST_MODEL, "prompt": "once ", "max_tokens": 12}


def key(value: str, **headers: str) -> dict[str, str]:
    return {"Idempotency-Key": value, **headers}


async def requests_created(redis) -> int:
    return len([name async for name in redis.scan_iter("req:{*}") if not name.endswith(b":chunks")])


async def test_a_retried_generate_is_the_first_request(start_fleet: StartFleet, redis) -> None:
    fleet = await start_fleet()
    first = await fleet.post("/v1/generate", BODY, headers=key("k-1"))
    again = await fleet.post("/v1/generate", {**BODY}, headers=key("k-1"))  # same body, keys reordered or not
    assert first[0] == again[0] == 202 and first[1] == again[1]
    request_id = first[1]["request_id"]
    assert again[2].headers["X-Request-Id"] == again[2].headers["Location"].rsplit("/", 1)[1] == request_id
    assert (await fleet.wait_done(request_id))["text"] == echo("once ", 12)
    status, after, _ = await fleet.post("/v1/generate", BODY, headers=key("k-1"))  # after it finished, too
    assert status == 202 and after == first[1]
    assert await requests_created(redis) == 1

    status, reply, _ = await fleet.post("/v1/generate", {**BODY, "max_tokens": 13}, headers=key("k-1"))
    assert status == 422 and reply["error"]["param"] == "Idempotency-Key" and request_id in reply["error"]["message"]
    status, reply, _ = await fleet.post("/v1/chat/completions", {"model": TEST_MODEL, "messages": [
        {"role": "user", "content": "hi"}]}, headers=key("k-1"))
    assert status == 422, "a key names one request, whatever the route"
    for bad in ("", "x" * 256, "tab\there"):
        status, reply, _ = await fleet.post("/v1/generate", BODY, headers=key(bad))
        assert status in (400, 422), (bad, reply)
    assert (await fleet.post("/v1/generate", BODY, headers=key("k-2")))[1]["request_id"] != request_id
    assert await requests_created(redis) == 2


async def test_a_retry_is_not_refused_when_the_queue_is_full(start_fleet: StartFleet) -> None:
    """The first POST filled the queue; its retry is that request, not a 429."""
    fleet = await start_fleet(max_outstanding=1, engine={"step_delay_ms": 100})  # the first runs ~1 s
    status, first, _ = await fleet.post("/v1/generate", BODY, headers=key("full"))
    assert status == 202
    assert (await fleet.post("/v1/generate", BODY))[0] == 429
    status, again, _ = await fleet.post("/v1/generate", BODY, headers=key("full"))
    assert status == 202 and again["request_id"] == first["request_id"]


async def test_openai_retries_get_the_same_completion_streamed_or_not(start_fleet: StartFleet, redis) -> None:
    fleet = await start_fleet(engine={"step_delay_ms": 5})
    body = {"model": TEST_MODEL, "prompt": "openai ", "max_tokens": 20}
    status, first, first_response = await fleet.post("/v1/completions", body, headers=key("oa"))
    status2, again, again_response = await fleet.post("/v1/completions", body, headers=key("oa"))
    assert status == status2 == 200 and first["choices"] == again["choices"] and first["id"] == again["id"]
    assert first_response.headers["X-Request-Id"] == again_response.headers["X-Request-Id"]

    streamed = {**body, "stream": True}
    texts, ids = [], set()
    for _ in range(2):  # the second POST replays the first request's stream from its start
        async with fleet.http.post(fleet.base_url + "/v1/completions", json=streamed, headers=key("oa-s")) as r:
            assert r.status == 200
            ids.add(r.headers["X-Request-Id"])
            events = [json.loads(line[6:]) for line in (await r.text()).splitlines()
                      if line.startswith("data: {")]
            texts.append("".join(e["choices"][0]["text"] for e in events if e.get("choices")))
    assert len(ids) == 1 and texts[0] == texts[1] == echo("openai ", 20)
    assert await requests_created(redis) == 2


async def test_keys_belong_to_their_api_key_and_expire_with_the_result(start_fleet: StartFleet, redis) -> None:
    fleet = await start_fleet(workers=0, auth=True, result_ttl_s=1)
    await fleet.start_worker(settings={"result_ttl_s": 1})  # results are kept by whoever writes the end
    await fleet.wait_ready()
    alice = await api_keys.create(redis, ApiKey(name="alice"))
    bob = await api_keys.create(redis, ApiKey(name="bob"))
    bearer = {name: f"Bearer {secret}" for name, secret in (("alice", alice), ("bob", bob))}
    a = (await fleet.post("/v1/generate", BODY, headers=key("shared", Authorization=bearer["alice"])))[1]
    b = (await fleet.post("/v1/generate", BODY, headers=key("shared", Authorization=bearer["bob"])))[1]
    assert a["request_id"] != b["request_id"], "one caller's key never reaches another's request"

    for name, request_id in (("alice", a["request_id"]), ("bob", b["request_id"])):
        fleet.headers = {"Authorization": bearer[name]}
        await fleet.wait_done(request_id)
    stored = [name async for name in redis.scan_iter(f"{keys.idempotency('*', '*')}")]
    assert len(stored) == 2 and all([0 < await redis.pttl(name) <= 1000 for name in stored]), "as the result"
    await asyncio.sleep(1.5)
    again = (await fleet.post("/v1/generate", BODY, headers=key("shared", Authorization=bearer["alice"])))[1]
    assert again["request_id"] != a["request_id"], "after the result expired, the key starts a new request"


async def test_a_websocket_generate_with_a_key_is_sent_once(start_fleet: StartFleet, redis) -> None:
    fleet = await start_fleet()
    ids = []
    for _ in range(2):  # as a client that lost its socket before `accepted` would resend
        async with fleet.http.ws_connect(fleet.ws_url) as ws:
            await ws.send_json({**BODY, "idempotency_key": "ws-1", "outlive_socket": True})
            accepted = await ws.receive_json()
            assert accepted["type"] == "accepted", accepted
            ids.append(accepted["request_id"])
            messages = [await ws.receive_json()]
            while messages[-1]["type"] != "done":
                messages.append(await ws.receive_json())
            assert "".join(m.get("text", "") for m in messages) == echo("once ", 12)
    assert ids[0] == ids[1] and await requests_created(redis) == 1
