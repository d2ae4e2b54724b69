"""A quick look at the vLLM worker on the lent two-GPU machine (bench/gpu_setup.sh first): `llm-fleet up
--gpus 0,1` with SmolLM2 (dummy weights), a completion with every logit-shaping parameter, /tokenize, and
a second request sharing a long prefix with the first (it must go to the first one's engine and find the
prefix cached). Prints what it saw; results in bench/RESULTS.md.

    python bench/gpu_smoke.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.gpu_openai_parity import post as post_json
from common import keys
from common.embedded_redis import EmbeddedValkey

MODEL = "smollm2-135m"
BASE = "http://127.0.0.1:8500"


def post(path: str, body: dict[str, Any]) -> tuple[int, Any]:
    return post_json(BASE, path, body)


def wait_for_workers(count: int, timeout_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            with urllib.request.urlopen(BASE + "/v1/models", timeout=2) as response:
                data = json.load(response)["data"]
            if data and sum(w["state"] == "ready" for w in data[0]["workers"]) >= count:
                return time.monotonic() - started
        except (OSError, ValueError):
            pass
        time.sleep(1)
    raise RuntimeError("workers not ready")


def main() -> None:
    valkey = EmbeddedValkey()
    valkey.start()
    catalogue = Path(tempfile.mkdtemp()) / "catalogue.json"
    catalogue.write_text(json.dumps({MODEL: {"engine": "vllm", "source": f"/tmp/models/{MODEL}", "options": {
        "load_format": "dummy", "max_model_len": 2048, "gpu_memory_utilization": 0.5}}}))
    fleet = subprocess.Popen([sys.executable, "-m", "common.cli", "up", "--redis-url", valkey.url, "--port", "8500",
                              "--gpus", "0,1", "--worker-http-port", "0", "--model", MODEL, "--catalogue",
                              str(catalogue)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        print(f"two workers ready after {wait_for_workers(2, 240):.0f} s")
        print("shaped completion:", post("/v1/completions", {
            "model": MODEL, "prompt": "hello there", "max_tokens": 16, "temperature": 1.0, "seed": 1,
            "presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.2, "top_k": 5, "min_p": 0.05,
            "logit_bias": {"5": -100}, "stop_token_ids": [0]}))
        print("tokenize:", post("/tokenize", {"prompt": "hello there"}))
        client = redis.Redis.from_url(valkey.url)
        shared = "You are a helpful assistant. " * 40
        _, first = post("/v1/completions", {"model": MODEL, "prompt": shared + "first", "max_tokens": 4})
        time.sleep(1.5)  # the first one's blocks reach its engine's record (vLLM's KV events)
        _, second = post("/v1/completions", {"model": MODEL, "prompt": shared + "second", "max_tokens": 4})
        first_req, second_req = (keys.request(reply["id"].removeprefix("cmpl-")) for reply in (first, second))
        print("second request:", second["usage"], "entry", client.hget(second_req, "entry"), "ran on",
              client.hget(second_req, "worker"), "(first on", client.hget(first_req, "worker"), ")")
        print("prefix records:", {k.decode(): client.zcard(k) for k in client.scan_iter("prefix:*")})
    finally:
        os.killpg(fleet.pid, 2)
        fleet.wait(60)
        valkey.stop()


if __name__ == "__main__":
    main()
