"""The real SmolLM2-135M-Instruct on the CPU: batched decoding, and the whole path end to end."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from common.protocol import SamplingParams
from common.settings import BUILTIN_CATALOGUE, WorkerSettings
from tests.conftest import StartFleet, ws_collect

pytestmark = pytest.mark.model
SMOLLM2 = "smollm2-135m"


@pytest.fixture(scope="module")
def smollm2() -> tuple[object, object]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker.engines.gguf_cache import cached_model_dir, packaged_file

    model_dir = cached_model_dir(packaged_file(BUILTIN_CATALOGUE[SMOLLM2].source), Path(WorkerSettings().cache_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def _decode_all(model, tokenizer, requests, join_every: int) -> dict[str, str]:
    """Drive a BatchedDecoder like the engine does; a new request joins every `join_every` steps."""
    from worker.engines.cpu_batch import BatchedDecoder
    from worker.engines.sequence import Sequence

    decoder, pending = BatchedDecoder(model), list(requests)
    texts = {r.request_id: "" for r in requests}
    step = 0
    while pending or decoder.rows:
        if pending and step % join_every == 0:
            seq = Sequence(pending.pop(0), tokenizer.backend_tokenizer, frozenset({tokenizer.eos_token_id}))
            texts[seq.request_id] += seq.append(decoder.prefill(seq)).text
            if seq.finished:
                decoder.remove({seq.request_id})
        if decoder.rows:
            finished = set()
            for row, token in zip(list(decoder.rows), decoder.step(), strict=True):
                texts[row.seq.request_id] += row.seq.append(token).text
                if row.seq.finished:
                    finished.add(row.seq.request_id)
            decoder.remove(finished)
        step += 1
    return texts


def test_batched_decoding_matches_decoding_each_request_alone(smollm2) -> None:
    from worker.engines.base import EngineRequest

    model, tokenizer = smollm2
    prompts = ["Hello, how are you?", "Write a poem about the sea and the sky.", "What is 2+2?", "Tell me a story"]
    requests = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        requests.append(EngineRequest(str(i), list(ids), SamplingParams(max_tokens=12 + 4 * i, temperature=0.0)))
    alone = {r.request_id: _decode_all(model, tokenizer, [r], 1)[r.request_id] for r in requests}
    together = _decode_all(model, tokenizer, requests, join_every=3)  # staggered joins, different lengths
    assert together == alone
    assert all(text.strip() for text in alone.values())


def smollm2_worker_process(redis_url: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", "from common.cli import main; main()", "worker", "--redis-url", redis_url,
         "--model", SMOLLM2, "--worker-id", "cpu-test"],
        env={**os.environ, "LLM_FLEET_HEARTBEAT_INTERVAL_S": "0.5"},
    )


async def test_real_model_answers_through_the_whole_fleet(start_fleet: StartFleet, smollm2) -> None:
    fleet = await start_fleet(workers=0)
    worker = smollm2_worker_process(fleet.redis_url)
    try:
        await fleet.wait_ready(timeout_s=120)
        # Polling: a greedy chat answer.
        chat = [{"role": "user", "content": "Hello, how are you?"}]
        status, reply, _ = await fleet.post("/v1/generate", {"model": SMOLLM2, "messages": chat, "max_tokens": 24,
                                                             "temperature": 0})
        assert status == 202
        done = await fleet.wait_done(reply["request_id"], timeout_s=60)
        assert done["status"] == "completed" and done["text"].strip()
        assert 0 < done["usage"]["completion_tokens"] <= 24

        # /tokenize gives what the generate counted, and what the model's own (Hugging Face) tokenizer gives.
        _, hf_tokenizer = smollm2
        status, tokens, _ = await fleet.post("/tokenize", {"model": SMOLLM2, "messages": chat})
        assert status == 200 and tokens["count"] == done["usage"]["prompt_tokens"]
        rendered = hf_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        assert tokens["tokens"] == hf_tokenizer(rendered, add_special_tokens=False)["input_ids"]
        status, tokens, _ = await fleet.post("/tokenize", {"prompt": "The capital of France is",
                                                           "return_token_strs": True})
        assert tokens["tokens"] == hf_tokenizer("The capital of France is")["input_ids"]
        assert tokens["token_strs"] == hf_tokenizer.convert_ids_to_tokens(tokens["tokens"])
        status, text, _ = await fleet.post("/detokenize", {"tokens": tokens["tokens"]})
        assert status == 200 and text == {"prompt": "The capital of France is"}

        # Logit shaping reaches the model: top_k=1 samples the greedy text; a repetition penalty changes it.
        prompt = "List the days of the week: Monday, Tuesday,"
        texts = []
        for shaping in ({"temperature": 0}, {"temperature": 1.0, "top_k": 1, "seed": 7},
                        {"temperature": 0, "repetition_penalty": 1.8}):
            texts.append((await fleet.wait_done(await fleet.submit(model=SMOLLM2, prompt=prompt, max_tokens=12,
                                                                   **shaping), timeout_s=60))["text"])
        assert texts[1] == texts[0] and texts[2] != texts[0], texts

        # WebSocket: the same path, streamed.
        async with fleet.http.ws_connect(fleet.ws_url) as ws:
            await ws.send_json({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
            request_id = (await ws.receive_json())["request_id"]
            messages = (await ws_collect(ws, {request_id}, timeout_s=60))[request_id]
        assert messages[-1]["type"] == "done"
        assert "".join(m["text"] for m in messages if m["type"] == "chunk").strip()

        # Concurrency: four requests are decoded together, not one after another.
        ids = [await fleet.submit(model=SMOLLM2, prompt=f"Count to {n}:", max_tokens=16, temperature=0)
               for n in (3, 4, 5, 6)]
        results = [await fleet.wait_done(i, timeout_s=60) for i in ids]
        assert all(r["status"] == "completed" for r in results)
        starts = [r["timings"]["created_at"] + r["timings"]["queue_s"] for r in results]
        ends = [r["timings"]["created_at"] + r["timings"]["total_s"] for r in results]
        assert max(starts) < min(ends), "every request started before any finished"

        # The Batch API with the openai SDK: the same greedy answers as the requests above, at the batch priority.
        client = openai.AsyncOpenAI(base_url=fleet.base_url + "/v1", api_key="unused", max_retries=0)
        lines = [{"custom_id": f"count-{n}", "method": "POST", "url": "/v1/completions",
                  "body": {"model": SMOLLM2, "prompt": f"Count to {n}:", "max_tokens": 16, "temperature": 0}}
                 for n in (3, 4, 5, 6)]
        uploaded = await client.files.create(file=("counts.jsonl", "\n".join(json.dumps(x) for x in lines).encode()),
                                             purpose="batch")
        batch = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions",
                                            completion_window="24h")
        async with asyncio.timeout(120):
            while batch.status not in ("completed", "failed", "expired", "cancelled"):
                await asyncio.sleep(0.2)
                batch = await client.batches.retrieve(batch.id)
        assert batch.status == "completed" and batch.request_counts.completed == 4
        answers = {json.loads(line)["custom_id"]: json.loads(line)["response"]["body"]["choices"][0]["text"]
                   for line in (await client.files.content(batch.output_file_id)).text.splitlines()}
        assert answers == {f"count-{n}": r["text"] for n, r in zip((3, 4, 5, 6), results, strict=True)}
    finally:
        worker.terminate()
        await asyncio.to_thread(worker.wait, 30)
    assert worker.returncode == 0  # SIGTERM: drained and exited cleanly
