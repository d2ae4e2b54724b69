"""The real SmolLM2-135M-Instruct on the CPU: batched decoding, and the whole path end to end."""

from __future__ import annotations

import asyncio
import dataclasses
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


def _decode_all(model, tokenizer, requests, join_every: int, grammars=None, tokens=None) -> dict[str, str]:
    """Drive a BatchedDecoder like the engine does; a new request joins every `join_every` steps. The
    tokens each request generated go into `tokens`, if given."""
    from worker.engines.cpu_batch import BatchedDecoder
    from worker.engines.sequence import Sequence

    decoder, pending = BatchedDecoder(model), list(requests)
    texts = {r.request_id: "" for r in requests}
    seqs = {}
    step = 0
    while pending or decoder.rows:
        if pending and step % join_every == 0:
            seq = Sequence(pending.pop(0), tokenizer.backend_tokenizer, frozenset({tokenizer.eos_token_id}))
            request = seq.request
            constraint = None if request.params.response_format is None else grammars.constraint(
                request.params.response_format, request.prompt_token_ids[len(request.prompt_token_ids)
                                                                         - request.resumed_tokens:])
            (token, logprob), _ = decoder.prefill(seq, constraint)
            texts[seq.request_id] += seq.append(token, logprob).text
            seqs[seq.request_id] = seq
            if seq.finished:
                decoder.remove({seq.request_id})
        if decoder.rows:
            finished = set()
            for row, (token, logprob) in zip(list(decoder.rows), decoder.step(), strict=True):
                texts[row.seq.request_id] += row.seq.append(token, logprob).text
                if row.seq.finished:
                    finished.add(row.seq.request_id)
            decoder.remove(finished)
        step += 1
    if tokens is not None:
        tokens.update({request_id: seq.generated for request_id, seq in seqs.items()})
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


async def test_logprobs_n_and_seed_on_the_real_model(start_fleet: StartFleet, smollm2) -> None:
    """The logprobs are the model's: at temperature 0 the chosen token is the most likely, the alternatives
    come sorted, and prompt and output logprobs equal a plain forward pass of the model (1e-3)."""
    import torch

    fleet = await start_fleet(workers=0)
    worker = smollm2_worker_process(fleet.redis_url)
    client = openai.AsyncOpenAI(base_url=fleet.base_url + "/v1", api_key="none", max_retries=0)
    try:
        await fleet.wait_ready(timeout_s=120)
        prompt = "The capital of France is"
        completion = await client.completions.create(model=SMOLLM2, prompt=prompt, max_tokens=6, temperature=0,
                                                     logprobs=5, echo=True)
        logprobs = completion.choices[0].logprobs
        model, tokenizer = smollm2
        ids = tokenizer(completion.choices[0].text)["input_ids"]
        prompt_len = len(tokenizer(prompt)["input_ids"])
        assert len(logprobs.tokens) == len(ids) and logprobs.token_logprobs[0] is None
        with torch.inference_mode():
            expected = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        for position in range(1, len(ids)):
            assert abs(logprobs.token_logprobs[position] - float(expected[position - 1, ids[position]])) < 1e-3
            # As vLLM lists them: the token itself, then the 5 most likely others (4 if it is one of them).
            own, *others = logprobs.top_logprobs[position].items()
            assert own == (logprobs.tokens[position], logprobs.token_logprobs[position])
            assert [v for _, v in others] == sorted((v for _, v in others), reverse=True) and 4 <= len(others) <= 5
            if position >= prompt_len:  # generated, greedy: the most likely token
                assert own[1] >= others[0][1] - 1e-6

        chat = await client.chat.completions.create(
            model=SMOLLM2, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=5, temperature=0,
            logprobs=True, top_logprobs=3)
        content = chat.choices[0].logprobs.content
        assert "".join(t.token for t in content) == chat.choices[0].message.content
        assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-6) for t in content)

        # n samples: n choices; the same seed gives the same texts, another seed others.
        sampled = [await client.completions.create(model=SMOLLM2, prompt="Once upon a time", max_tokens=12,
                                                   temperature=1.0, n=3, seed=seed) for seed in (11, 11, 12)]
        texts = [[c.text for c in s.choices] for s in sampled]
        assert len(texts[0]) == 3 and len(set(texts[0])) > 1, texts
        assert texts[0] == texts[1] and texts[0] != texts[2], texts
    finally:
        await client.close()
        worker.terminate()
        await asyncio.to_thread(worker.wait, 30)


_PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
           "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}}}


def test_a_continued_structured_output_stays_valid(smollm2) -> None:
    """A job continued after its worker died: the grammar is walked through the earlier output first, so the
    JSON the new worker finishes is the one the client has half of, and it validates."""
    import jsonschema

    from common.protocol import Chunk, Job
    from worker.continuation import resume
    from worker.engines.base import EngineRequest
    from worker.engines.grammar import Grammars

    model, tokenizer = smollm2
    grammars = Grammars(tokenizer, int(model.config.vocab_size))
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": _PERSON}}
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Describe a person as JSON."}],
                                        add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    sampling = SamplingParams(max_tokens=60, temperature=0.0, response_format=fmt)
    job = Job("j", SMOLLM2, ids, dataclasses.asdict(sampling), 0.0)

    generated: dict[str, list[int]] = {}
    whole = _decode_all(model, tokenizer, [EngineRequest("j", ids, job.params)], 1, grammars, generated)["j"]
    jsonschema.validate(json.loads(whole), _PERSON)
    emitted = generated["j"][:5]  # the first worker got 5 tokens out before it died
    delivered = [Chunk(seq=1, text=tokenizer.decode(emitted), token_ids=emitted)]
    continuation = resume(job, delivered, tokenizer.decode)
    rest = _decode_all(model, tokenizer, [continuation.request], 1, grammars)["j"]
    jsonschema.validate(json.loads(delivered[0].text + continuation.unsent_text + rest), _PERSON)


async def test_response_format_on_the_real_model(start_fleet: StartFleet) -> None:
    """json_schema: 50 sampled answers (temperature 1), every one valid against the schema; json_object: JSON."""
    import jsonschema

    fleet = await start_fleet(workers=0)
    worker = smollm2_worker_process(fleet.redis_url)
    client = openai.AsyncOpenAI(base_url=fleet.base_url + "/v1", api_key="none", max_retries=0)
    try:
        await fleet.wait_ready(timeout_s=120)
        messages = [{"role": "user", "content": "Describe a person as JSON with a name and an age."}]
        fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": _PERSON, "strict": True}}
        replies = await asyncio.gather(*(client.chat.completions.create(
            model=SMOLLM2, messages=messages, max_tokens=80, temperature=1.0, n=10, seed=seed,
            response_format=fmt) for seed in range(5)))
        answers = [choice.message.content for reply in replies for choice in reply.choices]
        assert len(answers) == 50
        for answer in answers:
            jsonschema.validate(json.loads(answer), _PERSON)
        reply = await client.chat.completions.create(model=SMOLLM2, messages=messages, max_tokens=80,
                                                     temperature=0, response_format={"type": "json_object"})
        assert isinstance(json.loads(reply.choices[0].message.content), dict)

        # Tools: a named tool_choice or "required" makes the answer a call that parses into tool_calls.
        weather = {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 20}}}
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": weather}},
                 {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object",
                                                                                     "properties": {}}}}]
        ask = [{"role": "user", "content": "What is the weather in Paris?"}]
        for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
            reply = await client.chat.completions.create(model=SMOLLM2, messages=ask, tools=tools, tool_choice=choice,
                                                         max_tokens=60, temperature=0)
            [call] = reply.choices[0].message.tool_calls
            assert reply.choices[0].finish_reason == "tool_calls" and reply.choices[0].message.content is None
            assert call.function.name in ("get_weather", "get_time")
            if call.function.name == "get_weather":
                jsonschema.validate(json.loads(call.function.arguments), weather)
            stream = await client.chat.completions.create(model=SMOLLM2, messages=ask, tools=tools,
                                                          tool_choice=choice, max_tokens=60, temperature=0,
                                                          stream=True)
            streamed = [d for event in [e async for e in stream] for d in event.choices[0].delta.tool_calls or ()]
            assert streamed[0].function.name == call.function.name
            assert "".join(d.function.arguments or "" for d in streamed) == call.function.arguments
        # The call and its answer go back into the conversation.
        followed = await client.chat.completions.create(model=SMOLLM2, max_tokens=8, temperature=0, messages=[
            *ask, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21C"}])
        assert followed.choices[0].message.content
    finally:
        await client.close()
        worker.terminate()
        await asyncio.to_thread(worker.wait, 30)
