"""Submit-then-poll through the real gateway, Redis Streams and a test-engine worker."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import Any

import pytest

from common import keys
from common.errors import NotFound, Unavailable
from common.logs import JsonFormatter
from common.protocol import ModelCard, WorkerStatus
from gateway import tokenization
from gateway.models import ModelRegistry
from gateway.tokenization import PromptEncoder
from tests.conftest import TEST_MODEL, StartFleet


async def test_submit_then_poll_returns_the_generated_text(start_fleet: StartFleet) -> None:
    fleet = await start_fleet()
    status, reply, response = await fleet.post("/v1/generate", {"model": TEST_MODEL, "prompt": "abc", "max_tokens": 7})
    assert status == 202 and reply["status"] == "queued"
    assert response.headers["Location"] == f"/v1/requests/{reply['request_id']}"
    done = await fleet.wait_done(reply["request_id"])
    # The test engine echoes the prompt's tokens (bytes) cyclically.
    assert done["status"] == "completed"
    assert done["text"] == "abcabca"
    assert done["finish_reason"] == "length"
    assert done["usage"] == {"prompt_tokens": 3, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 0}}
    assert done["timings"]["total_s"] >= done["timings"]["ttft_s"] >= 0


async def test_seed_alias_route_and_omitted_model_use_the_only_served_model(start_fleet: StartFleet) -> None:
    fleet = await start_fleet()
    status, reply, _ = await fleet.post("/generate", {"prompt": "xy", "max_tokens": 3})
    assert status == 202 and reply["model"] == TEST_MODEL
    assert (await fleet.wait_done(reply["request_id"]))["text"] == "xyx"


async def test_chat_messages_go_through_the_models_chat_template(start_fleet: StartFleet) -> None:
    fleet = await start_fleet()
    request_id = await fleet.submit(messages=[{"role": "user", "content": "hi"}], max_tokens=40)
    done = await fleet.wait_done(request_id)
    rendered = "user: hi\nassistant: "  # the test engine's template, echoed back
    assert done["usage"]["prompt_tokens"] == len(rendered)
    assert done["text"].startswith(rendered)


async def test_stop_string_ends_generation_and_is_not_returned(start_fleet: StartFleet) -> None:
    fleet = await start_fleet()
    request_id = await fleet.submit(prompt="hello world", max_tokens=50, stop=["wor"])
    done = await fleet.wait_done(request_id)
    assert done["text"] == "hello "
    assert done["finish_reason"] == "stop"


async def test_finished_jobs_leave_the_stream_so_xlen_is_outstanding_work(start_fleet: StartFleet, redis) -> None:
    fleet = await start_fleet()
    ids = [await fleet.submit(prompt="p", max_tokens=3) for _ in range(5)]
    for request_id in ids:
        await fleet.wait_done(request_id)
    stream = keys.job_stream(TEST_MODEL)
    assert await redis.xlen(stream) == 0
    pending = await redis.xpending(stream, keys.CONSUMER_GROUP)
    assert pending["pending"] == 0


async def test_health_ready_and_models_report_the_fleet(start_fleet: StartFleet) -> None:
    """The gateway is ready without workers (scale to zero: it must stay in its Service so that requests
    queue and KEDA sees the lag); its /ready body says which models are ready, and why none is."""
    fleet = await start_fleet(workers=0)
    assert await fleet.get("/health") == (200, {"status": "ok"})
    status, reply = await fleet.get("/ready")
    assert status == 200 and reply["models"] == [] and "no live worker" in reply["models_reason"]

    await fleet.start_worker(load_delay_s=1.0)

    async def model_state() -> tuple[str, list]:
        listing = (await fleet.get("/v1/models"))[1]["data"]
        return (listing[0]["state"], listing[0]["workers"]) if listing else ("none", [])

    async with asyncio.timeout(5):
        while (await model_state())[0] != "loading":
            await asyncio.sleep(0.05)
    status, reply = await fleet.get("/ready")
    assert status == 200 and reply["models"] == [] and "loading" in reply["models_reason"]

    await fleet.wait_ready()
    assert (await fleet.get("/ready"))[1]["models"] == [TEST_MODEL]
    status, listing = await fleet.get("/models")
    assert status == 200 and listing["object"] == "list"
    (model,) = listing["data"]
    assert model["id"] == TEST_MODEL and model["state"] == "ready" and model["max_model_len"] == 4096
    assert model["workers"][0]["kv_capacity_tokens"] == 65536


async def test_ready_names_the_model_that_failed_to_load(start_fleet: StartFleet) -> None:
    """A misconfigured catalogue entry: the worker stays up, reports `failed` with the error, and
    /ready says so (an operator or a deploy script sees why, instead of waiting forever)."""
    fleet = await start_fleet(workers=0)
    await fleet.start_worker(max_model_len="not a number")
    async with asyncio.timeout(5):
        while "failed to load" not in (reply := (await fleet.get("/ready"))[1]).get("models_reason", ""):
            await asyncio.sleep(0.05)
    assert TEST_MODEL in reply["models_reason"] and "not a number" in reply["models_reason"]
    (model,) = (await fleet.get("/v1/models"))[1]["data"]
    assert model["state"] == "failed" and "not a number" in model["workers"][0]["error"]


async def test_a_model_registered_after_a_cached_read_is_seen_at_once(redis) -> None:
    """The gateway caches model cards for 2 s; a model registered inside that window (a worker that just
    finished loading) must not 404, nor list without its card (CI caught `max_model_len: None` on a
    just-ready model)."""
    registry = ModelRegistry(redis)
    await redis.delete(keys.MODELS)
    assert await registry.cards() == {}  # cached: empty
    card = ModelCard(name="late-model", engine="test", max_model_len=512)
    await redis.hset(keys.MODELS, card.name, card.pack())
    assert await registry.cards() == {}  # within the TTL the cache is trusted...
    assert await registry.resolve("late-model") == card  # ...but a name it lacks is looked up
    assert (await registry.cards(fresh=True))["late-model"] == card  # listings read fresh
    with pytest.raises(NotFound):
        await registry.resolve("never-registered")


async def test_a_burst_of_requests_reads_the_served_models_once(redis) -> None:
    """The per-request 'is this model served?' check reads workers' heartbeats at most once per second,
    and a burst that finds the answer stale makes one read, not one per request (at c=1000 on the GPU
    machine, a thousand concurrent reads exhausted the gateway's Redis pool: 22 requests got 503)."""
    reads = 0

    class CountingRegistry(ModelRegistry):
        async def live_workers(self) -> list:
            nonlocal reads
            reads += 1
            return await super().live_workers()

    registry = CountingRegistry(redis)
    card = ModelCard(name="m", engine="test", max_model_len=512)
    await asyncio.gather(*(registry.check_served(card) for _ in range(500)))
    assert reads == 1
    await asyncio.gather(*(registry.check_served(card) for _ in range(500)))
    assert reads == 1  # fresh for a second


async def test_log_lines_about_a_request_carry_its_request_id(start_fleet: StartFleet,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    fleet = await start_fleet()
    request_id = await fleet.submit(prompt="logged", max_tokens=2)
    status, _, response = await fleet.post("/v1/generate", {"model": "no-such-model", "prompt": "x"})
    assert status == 404
    lines = [json.loads(JsonFormatter("gateway").format(r)) for r in caplog.records if r.name.startswith("gateway")]
    accepted = [line for line in lines if line["msg"] == "accepted"]
    assert accepted == [{**accepted[0], "request_id": request_id, "model": TEST_MODEL, "max_tokens": 2,
                         "prompt_tokens": len("logged")}]
    refused = [line for line in lines if line["msg"].startswith("refused 404")]
    assert refused and refused[0]["request_id"] == response.headers["X-Request-Id"]


async def test_a_model_loaded_a_moment_ago_is_not_refused(redis) -> None:
    """Before answering 503 ("not loaded on any worker"), the gateway re-reads the workers if its answer
    is older than 0.2 s: a model that finished loading just now is served, not refused for a second."""
    registry = ModelRegistry(redis)
    card = ModelCard(name="m", engine="test", max_model_len=512)

    async def heartbeat(models: dict) -> None:
        status = WorkerStatus(worker_id="w", host="h", pid=1, state="serving", started_at=0, heartbeat_at=0,
                              models=models)
        await redis.set(keys.worker("w"), status.pack(), px=60_000)
        await redis.sadd(keys.WORKERS, "w")

    await heartbeat({})
    with pytest.raises(Unavailable, match="not loaded on any of the 1 live worker"):
        await registry.check_served(card)
    await heartbeat({"m": {"state": "loading", "progress": 0.5}})
    await asyncio.sleep(0.25)
    await registry.check_served(card)  # within the 1 s cache, yet not refused


async def test_prompts_are_tokenized_off_the_event_loop_many_per_thread_hop(
    start_fleet: StartFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tokenizing takes about a millisecond per thousand tokens: a burst of prompts must not stall the loop
    that relays every other stream. Prompts go to a thread in batches: those that arrive while a batch is
    encoded go together into the next one."""
    hops: list[tuple[bool, int]] = []
    real_tokenizer = tokenization.Tokenizer

    class RecordingTokenizer:
        def __init__(self, real: Any) -> None:
            self._real = real

        @classmethod
        def from_str(cls, text: str) -> RecordingTokenizer:
            return cls(real_tokenizer.from_str(text))

        def __getattr__(self, name: str) -> Any:
            return getattr(self._real, name)

        def encode_batch(self, texts: list[str], add_special_tokens: bool) -> Any:
            hops.append((threading.current_thread() is threading.main_thread(), len(texts)))
            time.sleep(0.05)  # a slow batch: the rest of the burst arrives meanwhile
            return self._real.encode_batch(texts, add_special_tokens=add_special_tokens)

    monkeypatch.setattr(tokenization, "Tokenizer", RecordingTokenizer)
    fleet = await start_fleet()
    prompts = [f"prompt number {i}" for i in range(30)]
    replies = await asyncio.gather(*(fleet.post("/v1/generate", {"model": TEST_MODEL, "prompt": p, "max_tokens": 1})
                                     for p in prompts))
    done = await asyncio.gather(*(fleet.wait_done(reply["request_id"]) for _, reply, _ in replies))
    # Each prompt got its own tokens back (the test engine echoes the prompt's bytes), in any batch.
    assert [d["usage"]["prompt_tokens"] for d in done] == [len(p) for p in prompts]
    assert [d["text"] for d in done] == [p[0] for p in prompts]
    assert sum(size for _, size in hops) == len(prompts)
    assert not any(on_loop for on_loop, _ in hops)
    assert len(hops) < len(prompts) // 3, hops


async def test_long_chat_messages_are_rendered_off_the_event_loop(
    start_fleet: StartFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chat template renders 20k characters in milliseconds: not on the loop. Short ones stay inline (a
    thread hop costs more than they do); both are tokenized off the loop."""
    fleet = await start_fleet(engine={"max_model_len": 32768})
    threads: list[bool] = []
    real = PromptEncoder.render

    def recording(self: PromptEncoder, messages: list[dict[str, Any]], **options: Any) -> str:
        threads.append(threading.current_thread() is threading.main_thread())
        return real(self, messages, **options)

    monkeypatch.setattr(PromptEncoder, "render", recording)
    for content in ("x" * 20_000, "short"):
        status, reply, _ = await fleet.post("/v1/generate", {"model": TEST_MODEL, "max_tokens": 2,
                                                             "messages": [{"role": "user", "content": content}]})
        assert status == 202, reply
    assert threads == [False, True]


async def test_a_tokenizer_error_fails_every_prompt_of_its_batch_and_the_next_batch_still_runs() -> None:
    """The batch encoder hands an exception to each waiter of the batch it hit; it keeps serving after."""
    from tokenizers import Tokenizer

    from worker.engines.echo import byte_tokenizer

    class Flaky:
        def __init__(self) -> None:
            self.real: Tokenizer = byte_tokenizer()
            self.fail = True

        def encode_batch(self, texts: list[str], add_special_tokens: bool) -> Any:
            if self.fail:
                self.fail = False
                raise ValueError("tokenizer broke")
            return self.real.encode_batch(texts, add_special_tokens=add_special_tokens)

    flaky = Flaky()
    encoder = tokenization._BatchEncoder(flaky, add_special_tokens=True)  # type: ignore[arg-type]
    first = await asyncio.gather(encoder.encode("ab"), encoder.encode("cd"), return_exceptions=True)
    assert [type(r) for r in first] == [ValueError, ValueError]
    assert await asyncio.gather(encoder.encode("ab"), encoder.encode("xyz")) == [
        flaky.real.encode("ab").ids, flaky.real.encode("xyz").ids]
