"""The WebSocket protocol: streaming, several requests per socket, attach, cancel, bad messages."""

from __future__ import annotations

import asyncio

from tests.conftest import TEST_MODEL, StartFleet, ws_collect


async def test_ws_streams_chunks_in_seq_order_and_text_equals_polled_text(start_fleet: StartFleet) -> None:
    fleet = await start_fleet()
    async with fleet.http.ws_connect(fleet.ws_url) as ws:
        await ws.send_json({"model": TEST_MODEL, "prompt": "The quick brown fox. ", "max_tokens": 200})
        accepted = await ws.receive_json()
        assert accepted["type"] == "accepted"
        request_id = accepted["request_id"]
        messages = (await ws_collect(ws, {request_id}))[request_id]
    chunks = [m for m in messages if m["type"] == "chunk"]
    seqs = [c["seq"] for c in chunks]
    assert len(chunks) > 1, "a 200-token generation should stream in several chunks"
    assert seqs == sorted(set(seqs)) and seqs[0] == 1
    done = messages[-1]
    assert done["type"] == "done" and done["finish_reason"] == "length"
    assert done["usage"]["completion_tokens"] == 200
    polled = await fleet.wait_done(request_id)
    assert "".join(c["text"] for c in chunks) == polled["text"]
    assert len(polled["text"]) == 200


async def test_ws_serves_several_requests_on_one_socket_with_client_ids(start_fleet: StartFleet) -> None:
    fleet = await start_fleet()
    prompts = {f"c{i}": f"prompt number {i} " for i in range(5)}
    by_client: dict[str, list[dict]] = {client_id: [] for client_id in prompts}
    async with fleet.http.ws_connect(fleet.ws_url) as ws:
        for client_id, prompt in prompts.items():
            await ws.send_json({"id": client_id, "prompt": prompt, "max_tokens": 30})
        finished = 0
        async with asyncio.timeout(20):
            while finished < len(prompts):
                message = await ws.receive_json()
                by_client[message["id"]].append(message)
                finished += message["type"] == "done"
    for client_id, messages in by_client.items():
        assert messages[0]["type"] == "accepted"
        assert {m["request_id"] for m in messages} == {messages[0]["request_id"]}
        text = "".join(m["text"] for m in messages if m["type"] == "chunk")
        assert text == (prompts[client_id] * 3)[:30]
    assert len({m[0]["request_id"] for m in by_client.values()}) == len(prompts)


async def test_ws_attach_with_last_seq_gets_the_rest_without_gaps_or_duplicates(start_fleet: StartFleet) -> None:
    fleet = await start_fleet(engine={"step_delay_ms": 5})
    async with fleet.http.ws_connect(fleet.ws_url) as ws:
        await ws.send_json({"prompt": "0123456789", "max_tokens": 300, "outlive_socket": True})
        request_id = (await ws.receive_json())["request_id"]
        first = []
        while len(first) < 2:
            message = await ws.receive_json()
            if message["type"] == "chunk":
                first.append(message)
    # The first socket is gone (the request outlives it); a new one attaches after seq 2.
    async with fleet.http.ws_connect(fleet.ws_url) as ws:
        await ws.send_json({"type": "attach", "request_id": request_id, "last_seq": first[-1]["seq"]})
        rest = (await ws_collect(ws, {request_id}))[request_id]
    chunks = first + [m for m in rest if m["type"] == "chunk"]
    # Seqs increase from 1 (a reader that fell behind gets waiting pieces merged: a chunk's seq is its
    # last); the text, whole, is what proves nothing is missing or twice.
    seqs = [c["seq"] for c in chunks]
    assert seqs[0] == 1 and seqs == sorted(set(seqs)), seqs
    polled = await fleet.wait_done(request_id)
    assert polled["status"] == "completed"
    assert "".join(c["text"] for c in chunks) == polled["text"]


async def test_ws_attach_to_a_finished_request_replays_it(start_fleet: StartFleet) -> None:
    fleet = await start_fleet()
    request_id = await fleet.submit(prompt="replay me", max_tokens=9)
    await fleet.wait_done(request_id)
    async with fleet.http.ws_connect(fleet.ws_url) as ws:
        await ws.send_json({"type": "attach", "request_id": request_id})
        messages = (await ws_collect(ws, {request_id}))[request_id]
    assert "".join(m["text"] for m in messages if m["type"] == "chunk") == "replay me"
    assert messages[-1]["type"] == "done"


async def test_ws_malformed_messages_get_errors_and_the_socket_stays_usable(start_fleet: StartFleet) -> None:
    fleet = await start_fleet()
    async with fleet.http.ws_connect(fleet.ws_url) as ws:
        bad = [
            ("{not json", 400),
            ("[1, 2]", 400),
            ('{"prompt": 5}', 422),
            ('{"model": "no-such-model", "prompt": "x"}', 404),
            ('{"type": "dance"}', 422),
            ('{"type": "attach", "request_id": "nope"}', 404),
            ('{"type": "cancel"}', 422),
            ('{"prompt": "x", "max_tokens": 0, "id": 7}', 422),
        ]
        for raw, status in bad:
            await ws.send_str(raw)
            reply = await ws.receive_json()
            assert reply["type"] == "error" and reply["status"] == status, (raw, reply)
            assert reply["message"]
        await ws.send_bytes(b"\x00\x01")
        assert (await ws.receive_json())["status"] == 400
        # Still usable after all of that.
        await ws.send_json({"prompt": "ok", "max_tokens": 4})
        request_id = (await ws.receive_json())["request_id"]
        messages = (await ws_collect(ws, {request_id}))[request_id]
        assert messages[-1]["type"] == "done"


async def test_ws_cancel_message_cancels_a_running_request(start_fleet: StartFleet) -> None:
    fleet = await start_fleet(engine={"step_delay_ms": 20})
    async with fleet.http.ws_connect(fleet.ws_url) as ws:
        await ws.send_json({"prompt": "slow", "max_tokens": 2000})
        request_id = (await ws.receive_json())["request_id"]
        while (await ws.receive_json())["type"] != "chunk":
            pass
        await ws.send_json({"type": "cancel", "request_id": request_id})
        messages = (await ws_collect(ws, {request_id}))[request_id]
    assert any(m["type"] == "cancelled" for m in messages)
    assert messages[-1]["type"] == "done" and messages[-1]["finish_reason"] == "cancelled"
    assert (await fleet.wait_done(request_id))["status"] == "cancelled"


async def test_closing_the_socket_cancels_its_requests_unless_they_outlive_it(start_fleet: StartFleet) -> None:
    fleet = await start_fleet(engine={"step_delay_ms": 10})
    async with fleet.http.ws_connect(fleet.ws_url) as ws:
        await ws.send_json({"id": "bound", "prompt": "a", "max_tokens": 1000})
        await ws.send_json({"id": "free", "prompt": "b", "max_tokens": 100, "outlive_socket": True})
        ids = {}
        while len(ids) < 2:
            message = await ws.receive_json()
            if message["type"] == "accepted":
                ids[message["id"]] = message["request_id"]
    bound = await fleet.wait_done(ids["bound"])
    assert bound["status"] == "cancelled"
    assert bound["usage"]["completion_tokens"] < 1000
    free = await fleet.wait_done(ids["free"])
    assert free["status"] == "completed" and free["text"] == "b" * 100
    await asyncio.sleep(0)


async def test_ws_attach_at_or_past_the_end_answers_at_once(start_fleet: StartFleet) -> None:
    """A client that has everything gets `done` again; one past the end gets a 422 naming last_seq.
    Neither waits (the relay would re-poll until the result expired)."""
    fleet = await start_fleet()
    request_id = await fleet.submit(prompt="the end ", max_tokens=16)
    done = await fleet.wait_done(request_id)
    async with fleet.http.ws_connect(fleet.ws_url) as ws, asyncio.timeout(5):
        await ws.send_json({"type": "attach", "request_id": request_id, "last_seq": done["last_seq"]})
        again = await ws.receive_json()
        assert again["type"] == "done" and again["seq"] == done["last_seq"] and again["finish_reason"] == "length"
        await ws.send_json({"type": "attach", "request_id": request_id, "last_seq": done["last_seq"] + 1})
        past = await ws.receive_json()
        assert past["type"] == "error" and past["status"] == 422 and "past the end" in past["message"]


async def test_ws_attaches_count_against_the_streams_per_socket_limit(start_fleet: StartFleet) -> None:
    fleet = await start_fleet(ws_max_streams_per_socket=2, engine={"step_delay_ms": 20})
    ids = [await fleet.submit(prompt=f"long {i} ", max_tokens=100) for i in range(3)]
    async with fleet.http.ws_connect(fleet.ws_url) as ws:
        for request_id in ids:
            await ws.send_json({"type": "attach", "request_id": request_id, "last_seq": 0, "id": request_id})
        refused = None
        async with asyncio.timeout(10):
            while refused is None:
                message = await ws.receive_json()
                if message["type"] == "error":
                    refused = message
        assert refused["status"] == 429 and refused["id"] == ids[2]
        # Attaching again to a request already streamed on this socket replaces it: not one more.
        await ws.send_json({"type": "attach", "request_id": ids[0], "last_seq": 0, "id": "again"})
        replies = await ws_collect(ws, set(ids[:2]))
    assert not any(m["type"] == "error" for messages in replies.values() for m in messages)
