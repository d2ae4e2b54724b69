"""`llm-fleet up` on the test engine as a subprocess, for the benchmarks that start their own fleet."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODEL = "test-echo"


def start_test_fleet(port: int, redis_url: str, *, workers: int = 1, step_ms: float = 2.0,
                     kv_cache_tokens: int = 65536, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A gateway on `port` and `workers` test-engine workers (each step `step_ms`), settings from `env`."""
    catalogue = Path(tempfile.mkdtemp()) / "catalogue.json"
    catalogue.write_text(json.dumps({MODEL: {"engine": "test", "options": {
        "max_model_len": 4096, "max_num_seqs": 64, "kv_cache_tokens": kv_cache_tokens, "step_delay_ms": step_ms}}}))
    return subprocess.Popen(
        [sys.executable, "-m", "common.cli", "up", "--redis-url", redis_url, "--port", str(port),
         "--worker-http-port", "0", "--workers", str(workers), "--model", MODEL, "--catalogue", str(catalogue)],
        cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})})


async def wait_ready(base_url: str, timeout_s: float = 120.0) -> None:
    """Until the gateway answers /ready with a model ready on some worker."""
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                async with http.get(f"{base_url}/ready") as response:
                    if response.status == 200 and (await response.json()).get("models"):
                        return
            except (TimeoutError, aiohttp.ClientError):
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"fleet not ready after {timeout_s:.0f} s")
