"""A structured-output answer continued on vLLM (its first worker died mid-answer) stays valid: the engine is
driven directly, as a worker drives it, with the real SmolLM2 weights. Skipped where there is no vLLM or no
GPU; run on the GPU machine with `pytest -m gpu tests/test_gpu_grammar.py` (bench/gpu_setup.sh first)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator

import pytest

from common.protocol import SamplingParams
from common.settings import ModelSpec
from tests.test_gpu_vllm import MODEL, MODEL_DIR, _why_skip

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_why_skip() is not None, reason=str(_why_skip()))]

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer"}}}


@pytest.fixture
async def engine(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[object]:
    from worker.engines.vllm_async import load_vllm_engine
    from worker.frontends import FrontendRole

    # This test process has touched CUDA (the skip check): vLLM's engine core must be spawned, not forked.
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    spec = ModelSpec(name=MODEL, engine="vllm", source=str(MODEL_DIR),
                     options={"max_model_len": 2048, "gpu_memory_utilization": 0.3,
                              "continue_structured_outputs": True})
    loaded = await load_vllm_engine(spec, lambda _: None, FrontendRole(index=0, count=1))
    yield loaded
    await loaded.close()


async def _run(engine, request) -> tuple[list[int], str, str | None]:
    tokens, text, finish = [], "", None
    async for output in engine.generate(request):
        tokens += output.token_ids
        text += output.text
        finish = output.finish_reason
    return tokens, text, finish


def _valid(text: str, what: str) -> None:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), PERSON)
    except (ValueError, jsonschema.ValidationError) as exc:
        raise AssertionError(f"{what}: {text!r} is not a valid person ({exc})") from None


async def test_a_continued_structured_answer_stays_valid_on_vllm(engine) -> None:
    from transformers import AutoTokenizer

    from worker.engines.base import EngineRequest

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Describe a person as JSON."}],
                                        add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    # Greedy, then sampled at temperature 1, where an unbounded integer can run past max_tokens: an answer
    # cut short by its length is no document at all, so those are counted, not checked.
    finished = 0
    for seed in range(6):
        params = SamplingParams(max_tokens=120, temperature=0.0 if seed == 0 else 1.0, seed=seed,
                                response_format=fmt)
        tokens, text, finish = await _run(engine, EngineRequest(f"whole-{seed}", ids, params))
        if finish != "stop":
            continue
        _valid(text, f"whole answer, seed {seed}")
        for done in (3, 7):  # the first worker got this many tokens out before it died
            said = tokens[:done]
            rest_params = dataclasses.replace(params, max_tokens=120 - done, seed=seed + 100)
            _, rest, finish = await _run(engine, EngineRequest(f"rest-{seed}-{done}", ids + said, rest_params,
                                                               resumed_tokens=done))
            if finish == "stop" or seed == 0:
                _valid(tokenizer.decode(said) + rest, f"seed {seed}, continued after {done} tokens: {rest!r}")
                finished += 1
    assert finished >= 6, f"only {finished} of 12 continuations ended within max_tokens"
