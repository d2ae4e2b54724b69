"""Bad input gets a clear error with the right status and OpenAI's error shape; never a 500."""

from __future__ import annotations

import pytest

from tests.conftest import TEST_MODEL, StartFleet


def _assert_error(status: int, reply: dict, expected: int, *words: str) -> None:
    assert status == expected, reply
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == expected
    for word in words:
        assert word in error["message"], error["message"]


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"model": "nope", "prompt": "x"}, 404, ["nope", TEST_MODEL]),
        ({"model": TEST_MODEL}, 422, ["prompt"]),
        ({"model": TEST_MODEL, "prompt": "x", "messages": [{"role": "user", "content": "y"}]}, 422, ["exactly one"]),
        ({"model": TEST_MODEL, "prompt": ""}, 422, ["prompt"]),
        ({"model": TEST_MODEL, "prompt": ["x"]}, 422, ["prompt"]),
        ({"model": 3, "prompt": "x"}, 422, ["model"]),
        ({"model": TEST_MODEL, "messages": []}, 422, ["messages"]),
        ({"model": TEST_MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 422, ["role"]),
        ({"model": TEST_MODEL, "messages": [{"role": "user", "content": 1}]}, 422, ["content"]),
        ({"model": TEST_MODEL, "prompt": "x", "max_tokens": 0}, 422, ["max_tokens"]),
        ({"model": TEST_MODEL, "prompt": "x", "max_tokens": "5"}, 422, ["max_tokens"]),
        ({"model": TEST_MODEL, "prompt": "x", "max_tokens": True}, 422, ["max_tokens"]),
        ({"model": TEST_MODEL, "prompt": "x", "max_tokens": 5000}, 422, ["4096", "max_tokens"]),
        ({"model": TEST_MODEL, "prompt": "x", "temperature": 2.5}, 422, ["temperature"]),
        ({"model": TEST_MODEL, "prompt": "x", "presence_penalty": 2.5}, 422, ["presence_penalty"]),
        ({"model": TEST_MODEL, "prompt": "x", "frequency_penalty": "1"}, 422, ["frequency_penalty"]),
        ({"model": TEST_MODEL, "prompt": "x", "repetition_penalty": 0}, 422, ["repetition_penalty"]),
        ({"model": TEST_MODEL, "prompt": "x", "top_k": -2}, 422, ["top_k"]),
        ({"model": TEST_MODEL, "prompt": "x", "top_k": 1.5}, 422, ["top_k"]),
        ({"model": TEST_MODEL, "prompt": "x", "min_p": 1.5}, 422, ["min_p"]),
        ({"model": TEST_MODEL, "prompt": "x", "stop_token_ids": [-1]}, 422, ["stop_token_ids"]),
        ({"model": TEST_MODEL, "prompt": "x", "stop_token_ids": [256]}, 422, ["stop_token_ids", "256"]),
        ({"model": TEST_MODEL, "prompt": "x", "logit_bias": {"x": 1}}, 422, ["logit_bias"]),
        ({"model": TEST_MODEL, "prompt": "x", "logit_bias": {"1": 101}}, 422, ["logit_bias"]),
        ({"model": TEST_MODEL, "prompt": "x", "logit_bias": {"300": 1}}, 422, ["logit_bias", "300"]),
        ({"model": TEST_MODEL, "prompt": "x", "temperature": -1}, 422, ["temperature"]),
        ({"model": TEST_MODEL, "prompt": "x", "top_p": 0}, 422, ["top_p"]),
        ({"model": TEST_MODEL, "prompt": "x", "stop": [1]}, 422, ["stop"]),
        ({"model": TEST_MODEL, "prompt": "x", "seed": -1}, 422, ["seed"]),
        ({"model": TEST_MODEL, "prompt": "x", "best_of": 2}, 422, ["best_of"]),
        ({"model": TEST_MODEL, "prompt": "x", "ignore_eos": "yes"}, 422, ["ignore_eos"]),
        ({"model": TEST_MODEL, "prompt": "x", "min_tokens": -1}, 422, ["min_tokens"]),
    ],
)
async def test_invalid_generate_requests_are_rejected(start_fleet: StartFleet, body, status, words) -> None:
    fleet = await start_fleet()
    _assert_error(*(await fleet.post("/v1/generate", body))[:2], status, *words)


async def test_invalid_json_is_400(start_fleet: StartFleet) -> None:
    fleet = await start_fleet()
    for raw in (b"{nope", b"[]", b"\xff\xfe"):
        async with fleet.http.post(fleet.base_url + "/v1/generate", data=raw) as response:
            _assert_error(response.status, await response.json(), 400)


async def test_body_over_the_size_limit_is_413(start_fleet: StartFleet) -> None:
    fleet = await start_fleet(max_body_bytes=1000)
    status, reply, _ = await fleet.post("/v1/generate", {"model": TEST_MODEL, "prompt": "x" * 2000})
    _assert_error(status, reply, 413, "1000")


async def test_prompt_longer_than_the_context_is_413_with_the_limit(start_fleet: StartFleet) -> None:
    fleet = await start_fleet()
    status, reply, _ = await fleet.post("/v1/generate", {"model": TEST_MODEL, "prompt": "y" * 5000})
    _assert_error(status, reply, 413, "5000 tokens", "4096")


async def test_unknown_request_id_is_404_for_poll_and_cancel(start_fleet: StartFleet) -> None:
    fleet = await start_fleet()
    _assert_error(*await fleet.get("/v1/requests/does-not-exist"), 404, "does-not-exist")
    _assert_error(*await fleet.delete("/v1/requests/does-not-exist"), 404)


async def test_unknown_route_and_wrong_method_are_json_errors(start_fleet: StartFleet) -> None:
    fleet = await start_fleet()
    _assert_error(*await fleet.get("/v2/nothing"), 404)
    _assert_error(*await fleet.get("/v1/generate"), 405)


async def test_omitting_model_with_no_model_registered_is_503(start_fleet: StartFleet) -> None:
    fleet = await start_fleet(workers=0)
    _assert_error(*(await fleet.post("/v1/generate", {"prompt": "x"}))[:2], 503, "worker")
