"""Fuzzing, with a bounded budget: every HTTP route from /openapi.json with schemathesis, and the
WebSocket protocol with hypothesis-generated frames. The fleet (`llm-fleet up`: gateway with
API keys on, one test-engine worker) runs in its own processes; afterwards it must still serve.

Checks: no response >= 500 (503 included: Redis is up and the model served throughout, so a 503
would be a bug dressed as an outage), every status and body as documented, no hang (a request
timeout fails the test), and on the WebSocket every frame gets answered without a 5xx but 502
(a failed generation). Derandomized, so
CI runs the same examples every time; raise max_examples locally to search further.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from common.embedded_redis import EmbeddedValkey, free_port
from common.fleet import interrupt
from gateway.openapi import SPEC
from tests.conftest import TEST_MODEL

REPO = Path(__file__).resolve().parent.parent
schema = schemathesis.openapi.from_dict(SPEC)


class FuzzTarget:
    def __init__(self, base_url: str, admin_key: str) -> None:
        self.base_url = base_url
        self.headers = {"Authorization": f"Bearer {admin_key}"}

    def generate_once(self) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.base_url}/v1/generate", method="POST", headers={**self.headers, "Content-Type": "application/json"},
            data=json.dumps({"model": TEST_MODEL, "prompt": "still alive ", "max_tokens": 12}).encode())
        with urllib.request.urlopen(request, timeout=10) as response:
            request_id = json.load(response)["request_id"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            get = urllib.request.Request(f"{self.base_url}/v1/requests/{request_id}", headers=self.headers)
            with urllib.request.urlopen(get, timeout=10) as response:
                state = json.load(response)
            if state["status"] in ("completed", "failed", "cancelled"):
                return state
            time.sleep(0.05)
        raise AssertionError("the fleet stopped serving")


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzTarget]:
    valkey = EmbeddedValkey(data_dir=tmp_path_factory.mktemp("fuzz-valkey"))
    valkey.start()
    catalogue = tmp_path_factory.mktemp("fuzz") / "catalogue.json"
    catalogue.write_text(json.dumps({TEST_MODEL: {"engine": "test", "options": {
        "max_model_len": 4096, "max_num_seqs": 64, "kv_cache_tokens": 65536, "step_delay_ms": 1}}}))
    env = {**os.environ, "LLM_FLEET_AUTH": "true", "LLM_FLEET_AUTH_CACHE_S": "0"}
    cli = [sys.executable, "-m", "common.cli"]
    created = subprocess.run([*cli, "keys", "--redis-url", valkey.url, "create", "--name", "fuzz-admin-9d", "--admin"],
                             check=True, capture_output=True, text=True, cwd=REPO, env=env)
    admin_key = created.stdout.strip()
    port = free_port()
    fleet = subprocess.Popen([*cli, "up", "--redis-url", valkey.url, "--port", str(port),
        "--worker-http-port", "0", "--model", TEST_MODEL,
                              "--catalogue", str(catalogue)], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base_url}/ready", timeout=2) as response:
                    if json.load(response).get("models"):  # the gateway is up and the model ready
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or fleet.poll() is not None:
                raise RuntimeError("the fleet did not get ready")
            time.sleep(0.2)
        yield FuzzTarget(base_url, admin_key)
    finally:
        interrupt(fleet, 30)
        valkey.stop()


@schema.parametrize()
@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_every_route_survives_schemathesis(case: schemathesis.Case, target: FuzzTarget) -> None:
    response = case.call_and_validate(base_url=target.base_url, headers=target.headers, timeout=15,
                                      checks=[not_a_server_error, status_code_conformance,
                                              response_schema_conformance])
    assert response.status_code != 503, f"503 while Redis is up and the model served: {response.text[:300]}"


_FIELDS = st.sampled_from(["type", "id", "model", "prompt", "messages", "max_tokens", "temperature", "top_p", "stop",
                           "seed", "request_id", "last_seq", "outlive_socket", "ignore_eos", "min_tokens"])
_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
    | st.sampled_from(["generate", "cancel", "attach", TEST_MODEL]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)
_FRAMES = st.one_of(
    st.dictionaries(_FIELDS | st.text(max_size=8), _VALUES, max_size=6).map(json.dumps),
    _VALUES.map(json.dumps),
    st.text(max_size=60),
    st.binary(max_size=40),
)


async def _exchange(target: FuzzTarget, frames: list[str | bytes]) -> list[dict[str, Any]]:
    """Send the frames, then a sentinel; every reply up to the sentinel's."""
    async with aiohttp.ClientSession() as http, http.ws_connect(target.base_url + "/ws/generate",
                                                               headers=target.headers) as ws:
        for frame in frames:
            await (ws.send_bytes(frame) if isinstance(frame, bytes) else ws.send_str(frame))
        await ws.send_json({"type": "cancel", "request_id": "no-such-request", "id": "sentinel"})
        replies = []
        async with asyncio.timeout(15):  # a hang fails the example
            while True:
                message = await ws.receive()
                assert message.type == aiohttp.WSMsgType.TEXT, f"socket ended: {message}"
                reply = json.loads(message.data)
                if reply.get("id") == "sentinel" and reply.get("request_id") == "no-such-request":
                    assert reply["status"] == 404
                    return replies
                replies.append(reply)


@given(frames=st.lists(_FRAMES, min_size=1, max_size=5))
@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_the_websocket_protocol_survives_hypothesis(target: FuzzTarget, frames: list[str | bytes]) -> None:
    for reply in asyncio.run(_exchange(target, frames)):
        assert reply.get("type") in ("accepted", "chunk", "done", "error", "cancelled"), reply
        if reply["type"] == "error":
            assert 400 <= reply["status"] < 500 or reply["status"] == 502, reply  # 502: a failed generation


def test_the_fleet_still_serves_after_the_fuzzing(target: FuzzTarget) -> None:
    state = target.generate_once()
    assert state["status"] == "completed" and state["text"] == "still alive "
