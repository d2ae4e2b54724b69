"""The whole OpenAI request on the test engine: logprobs, echo, token-id prompts and n, through the queue,
the poll result, the WebSocket and a continuation. The echo "model" is sure of every token it echoes
(logprob 0; alternatives -9999, vLLM's stand-in for -inf), so the shapes are checked exactly; the real
model's logprobs are checked in test_cpu_model.py."""

from __future__ import annotations

import json

import aiohttp

from tests.conftest import TEST_MODEL, StartFleet


async def test_completions_logprobs_echo_and_token_id_prompts(start_fleet: StartFleet, sdk) -> None:
    fleet = await start_fleet()
    _, client = sdk(fleet)
    completion = await client.completions.create(model=TEST_MODEL, prompt="abc", max_tokens=4, logprobs=2,
                                                 echo=True)
    choice = completion.choices[0]
    assert choice.text == "abc" + "abca"
    logprobs = choice.logprobs
    assert logprobs.tokens == list("abcabca")
    assert logprobs.token_logprobs == [None, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # the first prompt token has none
    assert logprobs.top_logprobs[0] is None and logprobs.top_logprobs[1] == {"b": 0.0, "c": -9999.0}
    assert logprobs.text_offset == list(range(7))
    # Token ids as the prompt (lm-evaluation-harness sends them): the same as the text.
    ids = (await fleet.post("/tokenize", {"model": TEST_MODEL, "prompt": "abc"}))[1]["tokens"]
    by_ids = await client.completions.create(model=TEST_MODEL, prompt=ids, max_tokens=4, logprobs=2, echo=True)
    assert by_ids.choices[0].text == choice.text and by_ids.choices[0].logprobs == logprobs
    assert by_ids.usage.prompt_tokens == 3
    status, reply, _ = await fleet.post("/v1/completions", {"model": TEST_MODEL, "prompt": [999], "max_tokens": 1})
    assert status == 422 and reply["error"]["param"] == "prompt" and "999" in reply["error"]["message"]
    # Streamed: the prompt and its logprobs come first, then each chunk's own.
    stream = await client.completions.create(model=TEST_MODEL, prompt="abc", max_tokens=4, logprobs=1, echo=True,
                                             stream=True)
    events = [event async for event in stream]
    text = "".join(e.choices[0].text for e in events)
    tokens = [t for e in events if e.choices[0].logprobs for t in e.choices[0].logprobs.tokens]
    offsets = [o for e in events if e.choices[0].logprobs for o in e.choices[0].logprobs.text_offset]
    assert text == "abcabca" and tokens == list("abcabca") and offsets == list(range(7))


async def test_chat_logprobs_and_the_poll_result_and_websocket_carry_them(start_fleet: StartFleet, sdk) -> None:
    fleet = await start_fleet()
    _, client = sdk(fleet)
    chat = await client.chat.completions.create(model=TEST_MODEL, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=3, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    assert all(t.logprob == 0.0 and [a.logprob for a in t.top_logprobs] == [0.0, -9999.0] for t in content)
    assert content[0].bytes == list(content[0].token.encode())
    status, reply, _ = await fleet.post("/v1/chat/completions", {
        "model": TEST_MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2})
    assert status == 422 and "logprobs" in reply["error"]["message"]

    polled = await fleet.wait_done(await fleet.submit(prompt="hey", max_tokens=3, logprobs=1))
    ids = (await fleet.post("/tokenize", {"model": TEST_MODEL, "prompt": "heyo"}))[1]["tokens"]
    assert polled["text"] == "hey"
    assert [(t["token_id"], t["logprob"], t["top_logprobs"]) for t in polled["logprobs"]] == [
        (i, 0.0, [{"token_id": i, "logprob": 0.0}]) for i in ids[:3]]
    plain = await fleet.wait_done(await fleet.submit(prompt="hey", max_tokens=3))
    assert "logprobs" not in plain

    async with aiohttp.ClientSession() as session, session.ws_connect(fleet.ws_url) as ws:
        await ws.send_json({"model": TEST_MODEL, "prompt": "yo", "max_tokens": 4, "logprobs": 0})
        streamed = []
        while (message := json.loads((await ws.receive()).data))["type"] != "done":
            streamed += message.get("logprobs", [])
    y, o = ids[2:]
    assert [t["token_id"] for t in streamed] == [y, o, y, o]


async def test_n_choices_stream_with_their_index_and_each_is_a_request(start_fleet: StartFleet, sdk) -> None:
    fleet = await start_fleet()
    _, client = sdk(fleet)
    completion = await client.completions.create(model=TEST_MODEL, prompt="abc", max_tokens=5, n=3)
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert {c.text for c in completion.choices} == {"abcab"}
    assert completion.usage.prompt_tokens == 3 and completion.usage.completion_tokens == 15
    # Each choice is its own request, pollable: `{id}-{i}` for i > 0.
    request_id = completion.id.removeprefix("cmpl-")
    for suffix in ("", "-1", "-2"):
        assert (await fleet.get(f"/v1/requests/{request_id}{suffix}"))[1]["text"] == "abcab"

    stream = await client.chat.completions.create(model=TEST_MODEL, messages=[{"role": "user", "content": "q"}],
                                                  max_tokens=4, n=2, stream=True,
                                                  stream_options={"include_usage": True})
    texts: dict[int, str] = {}
    finished: list[int] = []
    usage = None
    async for event in stream:
        for choice in event.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finished.append(choice.index)
        usage = event.usage or usage
    assert sorted(finished) == [0, 1] and texts[0] == texts[1] and len(texts[0]) == 4
    assert usage.completion_tokens == 8


async def test_n_over_capacity_is_a_429_and_leaves_nothing_queued(start_fleet: StartFleet) -> None:
    fleet = await start_fleet(workers=0, max_outstanding=2)
    await fleet.start_worker()
    await fleet.wait_ready()
    await fleet.stop_workers()  # nothing runs: the queue fills
    status, _, response = await fleet.post("/v1/completions", {"model": TEST_MODEL, "prompt": "x", "n": 3})
    assert status == 429
    request_id = response.headers["X-Request-Id"]
    for choice in (request_id, f"{request_id}-1"):  # the two choices queued before the third was refused
        assert (await fleet.get(f"/v1/requests/{choice}"))[1]["status"] == "cancelled"
    assert (await fleet.get(f"/v1/requests/{request_id}-2"))[0] == 404
    status, _, _ = await fleet.post("/v1/generate", {"model": TEST_MODEL, "prompt": "x"})
    assert status == 202  # the cancelled choices no longer count against the cap


async def test_a_parameter_the_engine_cannot_honour_is_a_400_naming_the_engine(start_fleet: StartFleet) -> None:
    fleet = await start_fleet()
    _, models = await fleet.get("/v1/models")
    [card] = [m for m in models["data"] if m["id"] == TEST_MODEL]
    assert card["unsupported_parameters"] == ["response_format"]
    status, reply, _ = await fleet.post("/v1/chat/completions", {
        "model": TEST_MODEL, "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_object"}})
    assert status == 400 and reply["error"]["param"] == "response_format"
    assert "test engine" in reply["error"]["message"]
    status, reply, _ = await fleet.post("/v1/chat/completions", {  # "text" constrains nothing: taken
        "model": TEST_MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
        "response_format": {"type": "text"}})
    assert status == 200
    status, reply, _ = await fleet.post("/v1/completions", {
        "model": TEST_MODEL, "prompt": "x", "response_format": {"type": "json_schema", "json_schema": {}}})
    assert status == 422 and reply["error"]["param"] == "response_format"


async def test_tool_requests_are_checked(start_fleet: StartFleet) -> None:
    fleet = await start_fleet()
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    ask = {"model": TEST_MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    status, reply, _ = await fleet.post("/v1/chat/completions", {**ask, "tools": tools})  # "auto", the default
    assert status == 400 and reply["error"]["param"] == "tool_choice" and "parser" in reply["error"]["message"]
    status, reply, _ = await fleet.post("/v1/chat/completions", {
        **ask, "tools": tools, "tool_choice": {"type": "function", "function": {"name": "other"}}})
    assert status == 422 and "other" in reply["error"]["message"]
    status, reply, _ = await fleet.post("/v1/chat/completions", {**ask, "tool_choice": "required"})
    assert status == 422 and "tools" in reply["error"]["message"]
    status, reply, _ = await fleet.post("/v1/chat/completions", {**ask, "tools": tools, "tool_choice": "required"})
    assert status == 400 and "test engine" in reply["error"]["message"]  # the call is a grammar it cannot follow
    status, reply, _ = await fleet.post("/v1/chat/completions", {**ask, "tools": tools, "tool_choice": "none"})
    assert status == 200 and reply["choices"][0]["message"]["content"]
    status, reply, _ = await fleet.post("/v1/chat/completions", {**ask, "messages": [
        {"role": "user", "content": "x"}, {"role": "assistant", "content": None}]})
    assert status == 422 and "tool_calls" in reply["error"]["message"]
    status, reply, _ = await fleet.post("/v1/chat/completions", {**ask, "messages": [  # arguments not JSON: as text
        {"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{broken"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "y"}]})
    assert status == 200, reply


async def test_auto_tool_calls_are_read_by_the_models_parser(start_fleet: StartFleet) -> None:
    """tool_choice "auto" on a model whose catalogue names its parser (hermes): the calls the model writes
    come back as tool_calls, the text before them as content; streamed, the text first, the calls at the
    end. The test engine echoes its rendered prompt, so the prompt holds what "the model" writes."""
    fleet = await start_fleet(engine={"tool_call_parser": "hermes"})
    _, models = await fleet.get("/v1/models")
    assert [m["tool_call_parser"] for m in models["data"] if m["id"] == TEST_MODEL] == ["hermes"]
    said = 'Let me look. <tool_call>{"name": "lookup", "arguments": {"q": "tea"}}</tool_call>'
    body = {"model": TEST_MODEL, "messages": [{"role": "user", "content": said}], "stop": ["\nassistant"],
            "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]}
    status, reply, _ = await fleet.post("/v1/chat/completions", body)
    assert status == 200, reply
    [choice] = reply["choices"]
    assert choice["message"]["content"] == "user: Let me look."
    [call] = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "lookup", "arguments": '{"q": "tea"}'} and call["type"] == "function"
    assert choice["finish_reason"] == "tool_calls"

    async with fleet.http.post(fleet.base_url + "/v1/chat/completions", json={**body, "stream": True}) as response:
        events = [json.loads(line[6:]) for line in (await response.text()).splitlines()
                  if line.startswith("data: {")]
    deltas = [e["choices"][0]["delta"] for e in events]
    content = "".join(d.get("content") or "" for d in deltas)
    calls = [c for d in deltas for c in d.get("tool_calls", ())]
    assert content == "user: Let me look. " and [c["function"] for c in calls] == [call["function"]]
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"

    status, reply, _ = await fleet.post("/v1/chat/completions", {  # no call written: plain text
        **body, "messages": [{"role": "user", "content": "no call here"}], "max_tokens": 8})
    assert status == 200 and "tool_calls" not in reply["choices"][0]["message"]
