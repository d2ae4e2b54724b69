"""POST /tokenize and /detokenize (as `vllm serve` has them) on the test engine's byte tokenizer: the
counts a generate uses, chat templates with and without the generation prompt, and clear 4xx for bad
input. The real SmolLM2 is compared with its Hugging Face tokenizer in tests/test_cpu_model.py."""

from __future__ import annotations

import pytest

from tests.conftest import TEST_MODEL, StartFleet


async def test_tokenize_counts_what_a_generate_counts_and_detokenize_inverts_it(start_fleet: StartFleet) -> None:
    fleet = await start_fleet()
    prompt = "héllo, tokens"  # byte tokens: é is two
    status, tokens, _ = await fleet.post("/tokenize", {"model": TEST_MODEL, "prompt": prompt,
                                                       "return_token_strs": True})
    assert status == 200
    assert tokens["count"] == len(prompt.encode()) == len(tokens["tokens"]) == len(tokens["token_strs"])
    assert tokens["max_model_len"] == 4096 and tokens["token_strs"][0] == "h"
    done = await fleet.wait_done(await fleet.submit(prompt=prompt, max_tokens=2))
    assert done["usage"]["prompt_tokens"] == tokens["count"]
    assert (await fleet.post("/detokenize", {"tokens": tokens["tokens"]}))[1] == {"prompt": prompt}

    chat = [{"role": "user", "content": "hi"}]
    _, with_prompt, _ = await fleet.post("/tokenize", {"messages": chat})
    _, without, _ = await fleet.post("/tokenize", {"messages": chat, "add_generation_prompt": False})
    assert with_prompt["count"] == len("user: hi\nassistant: ") and without["count"] == len("user: hi\n")
    assert with_prompt["token_strs"] is None
    done = await fleet.wait_done(await fleet.submit(messages=chat, max_tokens=2))
    assert done["usage"]["prompt_tokens"] == with_prompt["count"]


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 422, "prompt"),
    ("/tokenize", {}, 422, "prompt"),
    ("/tokenize", {"prompt": 5}, 422, "prompt"),
    ("/tokenize", {"prompt": "a", "add_special_tokens": "yes"}, 422, "add_special_tokens"),
    ("/tokenize", {"prompt": "a", "tools": []}, 422, "tools"),
    ("/tokenize", {"messages": [{"role": "robot", "content": "b"}]}, 422, "messages"),
    ("/tokenize", {"model": "nope", "prompt": "a"}, 404, "model"),
    ("/detokenize", {"tokens": [1, 300]}, 422, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 422, "tokens"),
    ("/detokenize", {"tokens": "abc"}, 422, "tokens"),
    ("/detokenize", {"tokens": [True]}, 422, "tokens"),
    ("/detokenize", {}, 422, "tokens"),
])
async def test_bad_tokenize_requests_get_a_clear_error(start_fleet: StartFleet, path: str, body: dict, status: int,
                                                       param: str) -> None:
    fleet = await start_fleet()
    got, reply, _ = await fleet.post(path, body)
    assert got == status, reply
    assert reply["error"]["param"] == param
