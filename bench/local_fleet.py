"""Fleets on the test engine for the benchmarks that start their own: `llm-fleet up` as one subprocess,
or Valkey, a gateway and N workers as separate processes (to SIGTERM or SIGKILL one)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common.embedded_redis import EmbeddedValkey, free_port  # noqa: E402

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


class ProcessFleet:
    """Valkey, a gateway and N test-engine workers (engine `options`), each its own process."""

    def __init__(self, workers: int, options: dict[str, object], *, gateway_env: dict[str, str] | None = None,
                 worker_env: dict[str, str] | None = None) -> None:
        self.valkey = EmbeddedValkey()
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.catalogue = Path(tempfile.mkdtemp()) / "catalogue.json"
        self.catalogue.write_text(json.dumps({MODEL: {"engine": "test", "options": options}}))
        self.count = workers
        self.gateway_env = gateway_env or {}
        self.worker_env = worker_env or {}
        self.gateway: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.logs: dict[int, Path] = {}

    def _spawn(self, *argv: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # read after the process exits
        process = subprocess.Popen([sys.executable, "-m", "common.cli", *argv, "--redis-url", self.valkey.url,
                                    "--log-level", "WARNING"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                   stderr=log, env={**os.environ, **(env or {})})
        self.logs[process.pid] = Path(log.name)
        return process

    def handed_back(self, process: subprocess.Popen) -> int:
        """Jobs the worker re-queued on its drain, from its JSON log ("handing back N unfinished ...")."""
        lines = self.logs[process.pid].read_text().splitlines()
        messages = [json.loads(line)["msg"] for line in lines if line.startswith("{")]
        return sum(int(m.split()[2]) for m in messages if m.startswith("handing back "))

    def start(self) -> None:
        self.valkey.start()
        self.gateway = self._spawn("gateway", "--port", str(self.port), env=self.gateway_env)
        self.workers = [self._spawn("worker", "--model", MODEL, "--catalogue", str(self.catalogue),
                                    "--worker-id", f"worker-{i}", env=self.worker_env)
                        for i in range(self.count)]

    def stop(self) -> None:
        for process in [*self.workers, self.gateway]:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in [*self.workers, self.gateway]:
            if process is not None:
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
        self.valkey.stop()

    async def wait_ready(self, http: aiohttp.ClientSession) -> None:
        """Until every worker serves the model (the gateway lists N ready workers)."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                async with http.get(f"{self.base}/v1/models") as response:
                    models = (await response.json())["data"] if response.status == 200 else []
                if models and sum(w["state"] == "ready" for w in models[0]["workers"]) == self.count:
                    return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
        raise RuntimeError("fleet not ready")
