"""The Files and Batch APIs, driven by the real `openai` SDK: upload, create, poll, results; cancel, expiry;
bad input files; a batch carried on by another gateway; the real CPU model."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import api_keys, keys
from common.api_keys import ApiKey
from common.errors import FleetError
from common.protocol import WorkerStatus
from gateway.batch_input import InputChecker
from tests.conftest import TEST_MODEL, Fleet, StartFleet


def sdk(fleet: Fleet) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=fleet.base_url + "/v1", api_key="unused", max_retries=0)


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def completion_lines(count: int, *, url: str = "/v1/completions", **body: Any) -> list[dict[str, Any]]:
    """Prompts the test engine echoes whole (max_tokens: their length)."""
    return [{"custom_id": f"req-{i}", "method": "POST", "url": url,
             "body": {"model": TEST_MODEL, "prompt": f"line {i} says hello", "max_tokens": len(f"line {i} says hello"),
                      **body}}
            for i in range(count)]


async def start_batch(client: openai.AsyncOpenAI, lines: list[dict[str, Any]], *,
                      endpoint: str = "/v1/completions", window: str = "24h") -> Any:
    uploaded = await client.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch")
    return await client.batches.create(input_file_id=uploaded.id, endpoint=endpoint,  # type: ignore[arg-type]
                                       completion_window=window)  # type: ignore[arg-type]


async def run_batch(client: openai.AsyncOpenAI, lines: list[dict[str, Any]], *, endpoint: str = "/v1/completions",
                    window: str = "24h", timeout_s: float = 60.0) -> Any:
    batch = await start_batch(client, lines, endpoint=endpoint, window=window)
    return await wait_final(client, batch.id, timeout_s)


async def wait_completed(client: openai.AsyncOpenAI, batch_id: str, count: int) -> None:
    """Until `count` of the batch's lines completed."""
    async with asyncio.timeout(20):
        while (await client.batches.retrieve(batch_id)).request_counts.completed < count:
            await asyncio.sleep(0.05)


async def wait_final(client: openai.AsyncOpenAI, batch_id: str, timeout_s: float = 60.0) -> Any:
    async with asyncio.timeout(timeout_s):
        while True:
            batch = await client.batches.retrieve(batch_id)
            if batch.status in ("completed", "failed", "expired", "cancelled"):
                return batch
            await asyncio.sleep(0.1)


async def results(client: openai.AsyncOpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    """A result file's lines by custom_id (each custom_id once)."""
    if file_id is None:
        return {}
    lines = [json.loads(line) for line in (await client.files.content(file_id)).text.splitlines()]
    by_id = {line["custom_id"]: line for line in lines}
    assert len(by_id) == len(lines), "a custom_id appears twice"
    return by_id


async def test_the_openai_sdk_batch_flow_runs_every_line_and_reports_each_once(start_fleet: StartFleet) -> None:
    fleet = await start_fleet()
    client = sdk(fleet)
    lines = completion_lines(30)
    lines.append({"custom_id": "too-long", "method": "POST", "url": "/v1/completions",
                  "body": {"model": TEST_MODEL, "prompt": "x", "max_tokens": 100_000}})  # over the context
    lines.append({"custom_id": "n-2", "method": "POST", "url": "/v1/completions",
                  "body": {"model": TEST_MODEL, "prompt": "x", "n": 2}})  # a line is one completion
    lines.append({"custom_id": "logprobs", "method": "POST", "url": "/v1/completions",
                  "body": {"model": TEST_MODEL, "prompt": "ab", "max_tokens": 2, "logprobs": 1}})
    batch = await run_batch(client, lines)

    assert batch.status == "completed" and batch.request_counts.total == 33
    assert (batch.request_counts.completed, batch.request_counts.failed) == (31, 2)
    outputs, errors = await results(client, batch.output_file_id), await results(client, batch.error_file_id)
    assert set(outputs) == {f"req-{i}" for i in range(30)} | {"logprobs"} and set(errors) == {"too-long", "n-2"}
    assert outputs["logprobs"]["response"]["body"]["choices"][0]["logprobs"]["tokens"] == ["a", "b"]
    assert errors["n-2"]["response"]["status_code"] == 400
    for i in range(30):
        response = outputs[f"req-{i}"]["response"]
        assert response["status_code"] == 200
        assert response["body"]["choices"][0]["text"] == f"line {i} says hello"  # the test engine echoes
        assert response["body"]["usage"]["completion_tokens"] == len(f"line {i} says hello")
    assert errors["too-long"]["response"]["status_code"] == 422
    assert "max_tokens" in errors["too-long"]["response"]["body"]["error"]["message"]

    listed = await client.batches.list(limit=10)
    assert [b.id for b in listed.data] == [batch.id]
    output_file = await client.files.retrieve(batch.output_file_id)
    assert output_file.purpose == "batch_output" and output_file.bytes == len(
        (await client.files.content(batch.output_file_id)).content)
    await client.files.delete(batch.output_file_id)
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve(batch.output_file_id)


async def test_chat_and_native_endpoints_run_as_batches_at_the_batch_priority(start_fleet: StartFleet, redis) -> None:
    fleet = await start_fleet()
    client = sdk(fleet)
    chat = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": TEST_MODEL, "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 8}}
            for i in range(3)]
    batch = await run_batch(client, chat, endpoint="/v1/chat/completions")
    outputs = await results(client, batch.output_file_id)
    assert len(outputs) == 3
    assert all(o["response"]["body"]["object"] == "chat.completion" for o in outputs.values())
    request_id = outputs["c0"]["response"]["request_id"]
    assert (await redis.hget(keys.request(request_id), "priority")) == b"batch"

    native = completion_lines(2, url="/v1/generate")
    batch = await run_batch(client, native, endpoint="/v1/generate")
    outputs = await results(client, batch.output_file_id)
    assert outputs["req-1"]["response"]["body"]["text"] == "line 1 says hello"


async def test_a_bad_input_file_is_refused_naming_the_line(start_fleet: StartFleet) -> None:
    fleet = await start_fleet(workers=0, max_file_bytes=4096)
    client = sdk(fleet)
    good = completion_lines(3)
    cases = [
        (jsonl(good[:2]) + b"{not json\n", "line 3"),
        (jsonl([good[0], {**good[1], "custom_id": "req-0"}]), "line 2"),
        (jsonl([good[0], {**good[1], "url": "/v1/chat/completions"}]), "line 2"),
        (jsonl([good[0], {**good[1], "body": {**good[1]["body"], "model": "other"}}]), "line 2"),
        (jsonl([{**good[0], "method": "GET"}]), "line 1"),
        (b"\n\n", "no lines"),
    ]
    for content, named in cases:
        with pytest.raises(openai.BadRequestError) as raised:
            await client.files.create(file=("input.jsonl", content), purpose="batch")
        assert named in str(raised.value)
    with pytest.raises(openai.APIStatusError) as raised:
        await client.files.create(file=("big.jsonl", jsonl(completion_lines(100))), purpose="batch")
    assert raised.value.status_code == 413
    assert (await client.files.list()).data == []  # nothing half-stored

    uploaded = await client.files.create(file=("input.jsonl", jsonl(good)), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="/v1/completions"):
        await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                    completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        await client.batches.create(input_file_id="file-nope", endpoint="/v1/completions", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions",
                                    completion_window="forever")  # type: ignore[arg-type]


async def test_a_cancelled_batch_stops_and_reports_what_ran(start_fleet: StartFleet) -> None:
    fleet = await start_fleet(engine={"step_delay_ms": 20, "max_num_seqs": 4}, batch_window=8)
    client = sdk(fleet)
    batch = await start_batch(client, completion_lines(200))
    await wait_completed(client, batch.id, 4)
    cancelling = await client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling"
    batch = await wait_final(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at
    outputs, errors = await results(client, batch.output_file_id), await results(client, batch.error_file_id)
    assert len(outputs) == batch.request_counts.completed >= 4
    assert len(errors) == batch.request_counts.failed
    assert all(e["error"]["code"] == "batch_cancelled" for e in errors.values())
    assert len(outputs) + len(errors) < 200  # lines never fed are not run
    with pytest.raises(openai.ConflictError):
        await client.batches.cancel(batch.id)


async def test_an_expired_batch_reports_every_line_not_run_as_expired(start_fleet: StartFleet) -> None:
    fleet = await start_fleet(engine={"step_delay_ms": 20, "max_num_seqs": 4}, batch_window=8)
    client = sdk(fleet)
    batch = await run_batch(client, completion_lines(100), window="2s")
    assert batch.status == "expired" and batch.expired_at
    outputs, errors = await results(client, batch.output_file_id), await results(client, batch.error_file_id)
    assert set(outputs) | set(errors) == {f"req-{i}" for i in range(100)} and not set(outputs) & set(errors)
    assert all(e["error"]["code"] == "batch_expired" for e in errors.values())
    assert (batch.request_counts.completed, batch.request_counts.failed) == (len(outputs), len(errors))


async def test_a_batch_whose_gateway_goes_away_is_carried_on_by_another(start_fleet: StartFleet) -> None:
    first = await start_fleet(engine={"step_delay_ms": 5}, batch_window=16, batch_lease_ms=500)
    client = sdk(first)
    batch = await start_batch(client, completion_lines(120))
    await wait_completed(client, batch.id, 10)
    second = await start_fleet(workers=0, batch_lease_ms=500)
    assert first._runner is not None
    await first._runner.cleanup()  # the first gateway is gone, its lease lapses

    other = sdk(second)
    batch = await wait_final(other, batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 120
    outputs = await results(other, batch.output_file_id)
    assert set(outputs) == {f"req-{i}" for i in range(120)}


async def test_the_cli_submits_follows_and_fetches_a_batch(start_fleet: StartFleet, tmp_path) -> None:
    fleet = await start_fleet()
    source = tmp_path / "input.jsonl"
    source.write_bytes(jsonl(completion_lines(5)))
    cli = [sys.executable, "-m", "common.cli", "batch", "--url", fleet.base_url]
    submitted = await asyncio.create_subprocess_exec(*cli, "submit", str(source), "--wait",
                                                     stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(submitted.communicate(), 60)
    assert submitted.returncode == 0, err
    batch_id = out.decode().strip()
    assert batch_id.startswith("batch_") and b"5/5" in err  # the progress bar reached the end
    output = tmp_path / "output.jsonl"
    fetched = await asyncio.create_subprocess_exec(*cli, "results", batch_id, "--output", str(output))
    assert await asyncio.wait_for(fetched.wait(), 30) == 0
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(line["custom_id"] for line in lines) == [f"req-{i}" for i in range(5)]
    missing = await asyncio.create_subprocess_exec(*cli, "status", "batch_nope", stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(missing.communicate(), 30)
    assert missing.returncode != 0 and b"does not exist" in err


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                  max_size=3),
                     max_leaves=8)
_LINE = st.one_of(
    st.binary(max_size=40),
    _JSON.map(lambda value: json.dumps(value).encode()),
    st.fixed_dictionaries({"custom_id": _JSON, "method": st.sampled_from(["POST", "GET", 1]),
                           "url": st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/x", None]),
                           "body": st.one_of(_JSON, st.fixed_dictionaries({"model": _JSON}))}
                          ).map(lambda value: json.dumps(value).encode()))


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(_LINE, max_size=6), chunk=st.integers(min_value=1, max_value=64))
def test_any_upload_is_stored_whole_or_refused_with_a_4xx(lines: list[bytes], chunk: int) -> None:
    """Malformed JSONL, cut anywhere into chunks: accepted (every non-blank line kept), or a 400/413 naming the
    problem; never another exception."""
    content = b"\n".join(line.replace(b"\n", b" ") for line in lines)
    checker = InputChecker(max_bytes=10_000, max_lines=4)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(content), chunk):
            yield content[start:start + chunk]

    async def parts() -> list[bytes]:
        return [part async for part in checker.parts(chunks())]

    try:
        stored = asyncio.run(parts())
    except FleetError as exc:
        assert exc.status in (400, 413) and exc.message
        return
    kept = [line for line in b"".join(stored).split(b"\n") if line]
    assert kept == [line.replace(b"\n", b" ") for line in lines if line.replace(b"\n", b" ").strip()]
    assert checker.lines == len(kept) >= 1


async def test_a_batch_whose_input_file_is_deleted_fails_alone(start_fleet: StartFleet) -> None:
    fleet = await start_fleet(engine={"step_delay_ms": 20, "max_num_seqs": 4}, batch_window=4)
    client = sdk(fleet)
    batch = await start_batch(client, completion_lines(100))
    await wait_completed(client, batch.id, 2)
    await client.files.delete(batch.input_file_id)
    batch = await wait_final(client, batch.id)
    assert batch.status == "failed" and batch.failed_at and batch.errors is not None
    assert "deleted" in batch.errors.data[0].message
    assert (await fleet.get("/ready"))[0] == 200  # the runner goes on with other batches
    other = await run_batch(client, completion_lines(3))
    assert other.status == "completed" and other.request_counts.completed == 3


async def test_a_batch_waits_while_no_worker_serves_its_model(start_fleet: StartFleet, redis) -> None:
    fleet = await start_fleet(workers=0)
    await fleet.start_worker()  # registers the model, then leaves
    await fleet.wait_ready()
    await fleet.stop_workers()
    # A live worker that does not serve it (as after an operator unloaded it): requests for it get 503 now.
    idle = WorkerStatus(worker_id="idle", host="h", pid=1, state="serving", started_at=time.time(),
                        heartbeat_at=time.time())
    await redis.set(keys.worker("idle"), idle.pack(), ex=60)
    await redis.sadd(keys.WORKERS, "idle")
    assert (await fleet.post("/v1/completions", completion_lines(1)[0]["body"]))[0] == 503
    client = sdk(fleet)
    batch = await start_batch(client, completion_lines(5))
    await asyncio.sleep(1.0)
    waiting = await client.batches.retrieve(batch.id)
    assert waiting.status == "in_progress" and waiting.request_counts.failed == 0  # no line failed for it
    await redis.delete(keys.worker("idle"))
    await fleet.start_worker()
    batch = await wait_final(client, batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 5


async def test_files_and_batches_belong_to_the_key_that_made_them(start_fleet: StartFleet, redis) -> None:
    """With API keys, another key neither sees nor touches a key's files and batches (a 404, as for a
    request); an admin key reaches them. Lists page newest first."""
    fleet = await start_fleet(auth=True, auth_cache_s=0)
    alice, bob = [await api_keys.create(redis, ApiKey(name=name)) for name in ("alice", "bob")]
    admin = await api_keys.create(redis, ApiKey(name="ops", admin=True))

    def client(key: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=fleet.base_url + "/v1", api_key=key, max_retries=0)

    batches = [await run_batch(client(alice), completion_lines(2)) for _ in range(3)]
    mine = batches[0]
    for call in (client(bob).batches.retrieve(mine.id), client(bob).batches.cancel(mine.id),
                 client(bob).files.retrieve(mine.input_file_id), client(bob).files.content(mine.output_file_id),
                 client(bob).files.delete(mine.output_file_id)):
        with pytest.raises(openai.NotFoundError):
            await call
    assert (await client(bob).batches.list()).data == [] and (await client(bob).files.list()).data == []
    with pytest.raises(openai.NotFoundError):  # nor may another key run a batch over alice's file
        await client(bob).batches.create(input_file_id=mine.input_file_id, endpoint="/v1/completions",
                                         completion_window="24h")
    assert (await client(admin).batches.retrieve(mine.id)).id == mine.id

    first = await client(alice).batches.list(limit=2)
    assert [b.id for b in first.data] == [batches[2].id, batches[1].id] and first.has_more
    rest = await client(alice).batches.list(limit=2, after=first.data[-1].id)
    assert [b.id for b in rest.data] == [batches[0].id] and not rest.has_more
