"""The OpenAI-compatible API, driven by the real `openai` SDK (sync and async, streaming and not)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import openai
import pytest

from common import keys
from common.embedded_redis import EmbeddedValkey
from common.protocol import Job
from tests.conftest import TEST_MODEL, Fleet, StartFleet
from tests.test_faults import wait_until


async def test_completions_non_streaming_with_sync_and_async_sdk(start_fleet: StartFleet, sdk) -> None:
    fleet = await start_fleet()
    sync, client = sdk(fleet)
    completion = await client.completions.create(model=TEST_MODEL, prompt="hello", max_tokens=8)
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    assert completion.choices[0].text == "hellohel" and completion.choices[0].finish_reason == "length"
    assert completion.usage.prompt_tokens == 5 and completion.usage.total_tokens == 13
    # The same request through the sync SDK (off the event loop that runs the fleet).
    again = await asyncio.to_thread(sync.completions.create, model=TEST_MODEL, prompt=["hello"], max_tokens=8)
    assert again.choices[0].text == "hellohel"


async def test_chat_completions_non_streaming_uses_the_chat_template(start_fleet: StartFleet, sdk) -> None:
    fleet = await start_fleet()
    _, client = sdk(fleet)
    chat = await client.chat.completions.create(
        model=TEST_MODEL, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=30)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == "user: hi\nassistant: user: hi\na"


async def test_streaming_completions_and_chat_with_usage_in_the_last_chunk(start_fleet: StartFleet, sdk) -> None:
    fleet = await start_fleet()
    sync, client = sdk(fleet)
    stream = await client.completions.create(model=TEST_MODEL, prompt="abc", max_tokens=100, stream=True,
                                             stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ("abc" * 34)[:100]
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 100

    def chat_stream() -> list:
        return list(sync.chat.completions.create(model=TEST_MODEL, messages=[{"role": "user", "content": "yo"}],
                                                 max_tokens=12, stream=True))
    chat_chunks = await asyncio.to_thread(chat_stream)
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chat_chunks) == "user: yo\nass"
    assert chat_chunks[-1].choices[0].finish_reason == "length"


async def test_vllm_bench_serve_request_shape_streams_with_ignore_eos(start_fleet: StartFleet, sdk) -> None:
    """Exactly what vLLM 0.26's `vllm bench serve --backend openai` sends: raw HTTP, streaming, usage,
    ignore_eos, and repetition_penalty 1.0 (neutral)."""
    fleet = await start_fleet()
    body = {"model": TEST_MODEL, "prompt": "x y z", "repetition_penalty": 1.0, "max_tokens": 64, "logprobs": None,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    async with fleet.http.post(fleet.base_url + "/v1/completions", json=body) as response:
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
        request_id = response.headers["X-Request-Id"]
        events = [line[6:] async for line in (raw.decode().strip() async for raw in response.content)
                  if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    assert payloads[-1]["usage"]["completion_tokens"] == 64
    assert "".join(p["choices"][0]["text"] for p in payloads if p["choices"]) == ("x y z" * 13)[:64]
    polled = await fleet.wait_done(request_id)  # an OpenAI request is pollable like a native one
    assert polled["status"] == "completed" and polled["usage"]["completion_tokens"] == 64


async def test_every_response_carries_x_request_id(start_fleet: StartFleet, sdk) -> None:
    fleet = await start_fleet()
    status, reply, response = await fleet.post("/v1/completions", {"model": TEST_MODEL, "prompt": "q",
                                                                    "max_tokens": 2})
    assert status == 200 and reply["id"] == f"cmpl-{response.headers['X-Request-Id']}"
    status, _, response = await fleet.post("/v1/completions", {"model": "nope", "prompt": "q"})
    assert status == 404 and response.headers["X-Request-Id"]


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"model": "nope"}, openai.NotFoundError, ["nope"]),
        ({"n": 99}, openai.UnprocessableEntityError, ["n"]),
        ({"extra_body": {"guided_regex": "a+"}}, openai.BadRequestError, ["guided_regex"]),
        ({"best_of": 2}, openai.BadRequestError, ["best_of"]),
        ({"extra_body": {"response_format": {"type": "json_object"}}}, openai.BadRequestError, ["response_format"]),
        ({"logprobs": 21}, openai.UnprocessableEntityError, ["logprobs"]),
        ({"presence_penalty": 3}, openai.UnprocessableEntityError, ["presence_penalty"]),
        ({"max_tokens": 0}, openai.UnprocessableEntityError, ["max_tokens"]),
        ({"temperature": 9}, openai.UnprocessableEntityError, ["temperature"]),
        ({"prompt": "z" * 5000}, openai.APIStatusError, ["4096"]),
    ],
)
async def test_bad_requests_are_openai_errors_the_sdk_parses(
    start_fleet: StartFleet, sdk, kwargs, error, words
) -> None:
    fleet = await start_fleet()
    _, client = sdk(fleet)
    arguments = {"model": TEST_MODEL, "prompt": "x", "max_tokens": 4, **kwargs}
    with pytest.raises(error) as caught:
        await client.completions.create(**arguments)
    assert caught.value.status_code in (400, 404, 413, 422)
    for word in words:
        assert word in caught.value.message


async def test_429_is_a_rate_limit_error_with_retry_after(start_fleet: StartFleet, sdk) -> None:
    fleet = await start_fleet(workers=0, max_outstanding=1)
    await fleet.start_worker()
    await fleet.wait_ready()
    await fleet.stop_workers()  # the registered model's queue now fills
    _, client = sdk(fleet)
    first = asyncio.create_task(client.completions.create(model=TEST_MODEL, prompt="a", max_tokens=2))
    await wait_until(lambda: _queued(fleet, 1))
    with pytest.raises(openai.RateLimitError) as caught:
        await client.completions.create(model=TEST_MODEL, prompt="b", max_tokens=2)
    assert caught.value.response.headers["Retry-After"] == "1"
    await fleet.start_worker()
    assert (await first).choices[0].text == "aa"


async def test_dropping_an_sse_stream_cancels_the_request_and_frees_kv(start_fleet: StartFleet, sdk) -> None:
    fleet = await start_fleet(engine={"step_delay_ms": 10})
    _, client = sdk(fleet)
    stream = await client.completions.create(model=TEST_MODEL, prompt="go", max_tokens=3000, stream=True)
    request_id = stream.response.headers["X-Request-Id"]
    async for _ in stream:
        break
    await stream.close()
    budget = fleet.workers[0].budgets[TEST_MODEL]
    done = await fleet.wait_done(request_id)
    assert done["status"] == "cancelled" and done["usage"]["completion_tokens"] < 3000
    async with asyncio.timeout(5):
        while budget.used_tokens:
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
async def test_openai_routes_answer_bad_input_in_openai_shape(start_fleet: StartFleet, route: str) -> None:
    fleet = await start_fleet(max_body_bytes=2000)
    async with fleet.http.post(fleet.base_url + route, data=b"{broken") as response:
        assert response.status == 400 and (await response.json())["error"]["type"] == "invalid_request_error"
    status, reply, _ = await fleet.post(route, {"model": TEST_MODEL, "prompt": "p" * 3000,
                                                "messages": [{"role": "user", "content": "m" * 3000}]})
    assert status == 413 and "2000" in reply["error"]["message"]
    status, reply, _ = await fleet.post(route, {"model": TEST_MODEL})
    assert status == 422 and reply["error"]["param"] in ("prompt", "messages")
    status, reply, _ = await fleet.post(route, {"model": TEST_MODEL, "prompt": "x", "messages": [
        {"role": "user", "content": "x"}], "suffix": "s"})
    assert status == 400 and "suffix" in reply["error"]["message"]  # a parameter it takes only as a no-op


async def test_openai_routes_answer_503_when_redis_is_unreachable(start_fleet: StartFleet) -> None:
    from common.embedded_redis import free_port

    fleet = await start_fleet(workers=0, redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_timeout_s=0.5)
    chat = {"model": TEST_MODEL, "messages": [{"role": "user", "content": "x"}]}
    for route, body in [("/v1/completions", {"model": TEST_MODEL, "prompt": "x"}), ("/v1/chat/completions", chat)]:
        status, reply, response = await fleet.post(route, body)
        assert status == 503 and reply["error"]["type"] == "service_unavailable"
        assert response.headers["X-Request-Id"]


async def _queued(fleet: Fleet, count: int) -> bool:
    return await fleet.gateway.redis.xlen(keys.job_stream(TEST_MODEL)) == count


async def _sse_events(response: aiohttp.ClientResponse) -> list[Any]:
    """Every `data:` event of an SSE body, parsed ([DONE] as the string)."""
    events = []
    async for line in response.content:
        if line.startswith(b"data: "):
            data = line[6:].strip().decode()
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def test_an_sse_stream_that_fails_after_it_started_ends_with_an_error_event_and_done(
    start_fleet: StartFleet, tmp_path
) -> None:
    """Redis goes away mid-stream for longer than the stream's grace: the client gets an error event
    and [DONE] (a chunked body ends), never a second HTTP response inside the body or a hang."""
    server = EmbeddedValkey(data_dir=tmp_path / "valkey")
    server.start()
    try:
        fleet = await start_fleet(redis_url=server.url, redis_timeout_s=0.3, stream_outage_grace_s=0.5,
                                  stream_resync_s=0.2, engine={"step_delay_ms": 20})
        body = {"model": TEST_MODEL, "prompt": "interrupted ", "max_tokens": 500, "stream": True}
        async with fleet.http.post(fleet.base_url + "/v1/completions", json=body) as response, asyncio.timeout(20):
            assert response.status == 200
            first = await response.content.readline()
            assert first.startswith(b"data: ")
            server.stop()
            events = await _sse_events(response)
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == 503 and "poll" in events[-2]["error"]["message"]
    finally:
        server.stop()


async def test_an_sse_stream_whose_request_vanishes_ends_with_a_404_event(start_fleet: StartFleet, redis) -> None:
    fleet = await start_fleet(workers=0, stream_resync_s=0.2)
    await fleet.start_worker({"drain_timeout_s": 0.1}, step_delay_ms=20)
    await fleet.wait_ready()
    body = {"model": TEST_MODEL, "prompt": "gone ", "max_tokens": 500, "stream": True}
    async with fleet.http.post(fleet.base_url + "/v1/completions", json=body) as response, asyncio.timeout(20):
        request_id = response.headers["X-Request-Id"]
        await response.content.readline()
        await fleet.workers[0].unload(TEST_MODEL)  # handed back, and nothing serves it any more...
        await redis.delete(keys.request(request_id), keys.request_chunks(request_id))  # ...and it expired
        events = await _sse_events(response)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 404


@pytest.mark.parametrize("stream", [True, False])
async def test_a_client_that_leaves_while_its_request_is_queued_cancels_it(start_fleet: StartFleet,
                                                                           stream: bool) -> None:
    """The only slot is busy; the client gives up before its request starts: the request is cancelled
    (it frees its place in the queue and never runs), with no write needed to notice."""
    fleet = await start_fleet(engine={"step_delay_ms": 20, "max_num_seqs": 1})
    blocker = await fleet.submit(prompt="blocker ", max_tokens=100)
    body = {"model": TEST_MODEL, "prompt": "impatient ", "max_tokens": 5, "stream": stream}
    request_id = None
    with pytest.raises(TimeoutError):  # a streaming client gets its headers at once; the other waits
        async with fleet.http.post(fleet.base_url + "/v1/completions", json=body,
                                   timeout=aiohttp.ClientTimeout(total=0.5)) as response:
            request_id = response.headers["X-Request-Id"]
            await response.read()
    if request_id is None:  # non-streaming: the newest job is its
        [(_, fields)] = await fleet.gateway.redis.xrevrange(keys.job_stream(TEST_MODEL), count=1)
        request_id = Job.unpack(fields[b"job"]).request_id
    left = await fleet.wait_done(request_id, timeout_s=3)
    assert left["status"] == "cancelled" and left["text"] == "" and left["timings"]["queue_s"] is None
    assert (await fleet.get(f"/v1/requests/{blocker}"))[1]["status"] == "running"  # long before it ends


async def test_logprobs_zero_gives_the_chosen_tokens_only_and_continuous_usage_is_reported(
    start_fleet: StartFleet, sdk
) -> None:
    fleet = await start_fleet()
    _, client = sdk(fleet)
    completion = await client.completions.create(model=TEST_MODEL, prompt="xy", max_tokens=2, logprobs=0)
    logprobs = completion.choices[0].logprobs
    assert logprobs.tokens == ["x", "y"] and logprobs.token_logprobs == [0.0, 0.0]
    assert logprobs.top_logprobs == [{"x": 0.0}, {"y": 0.0}] and logprobs.text_offset == [0, 1]  # as vLLM: the token
    stream = await client.completions.create(
        model=TEST_MODEL, prompt="counted ", max_tokens=24, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True})
    usages = [(chunk.choices, chunk.usage) async for chunk in stream]
    counts = [usage.completion_tokens for choices, usage in usages if choices]
    assert counts == sorted(counts) and counts[-1] == 24 and all(u.prompt_tokens == 8 for _, u in usages)
    assert usages[-1][0] == [] and usages[-1][1].completion_tokens == 24  # include_usage's final event
