"""`llm-fleet up`: the whole fleet on one machine, supervised.

Embedded Valkey (unless --redis-url), one gateway (or several sharing the port), N worker
processes. Prints where to point a client once the fleet is ready; restarts a part that dies;
on Ctrl-C stops workers first (they finish their jobs), then the gateways, then Valkey.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from common import fleet_state
from common.embedded_redis import EmbeddedValkey
from common.progress import advance, load_bar, load_fraction
from common.redis_conn import REDIS_UNAVAILABLE, connect
from common.settings import load_catalogue

# NVLink multicast stays off wherever workers start NCCL (tensor parallelism): on shared hosts a
# program using it can take the GPUs out of service (the machines' notes).
_NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=8000, help="gateway port (default 8000)")
    parser.add_argument("--host", default="127.0.0.1", help="gateway bind address")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes (default 1, or one per GPU group with --gpus)")
    parser.add_argument("--gpus", help="GPUs for the workers, e.g. 0,1 ('all': every visible one): worker i gets "
                        "the i-th group of --gpus-per-worker of them as CUDA_VISIBLE_DEVICES")
    parser.add_argument("--gpus-per-worker", type=int, default=None,
                        help="GPUs each worker gets (default: the largest tensor_parallel_size of its models)")
    parser.add_argument("--gateways", type=int, default=1,
                        help="gateway processes sharing the port with SO_REUSEPORT (default 1)")
    parser.add_argument("--model", action="append", dest="models", help="model(s) each worker serves")
    parser.add_argument("--redis-url", help="use this Redis instead of starting an embedded Valkey")
    parser.add_argument("--catalogue", help="JSON model catalogue passed to the workers")
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for /ready")
    parser.add_argument("--worker-http-port", type=int, default=None,
                        help="first worker's /metrics port, worker i gets +i (default: gateway port + 1; 0: any free)")


@dataclass
class Part:
    name: str
    argv: list[str]
    env: dict[str, str] | None = None  # added to this process's environment
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = field(default=0.0)

    def start(self) -> None:
        # Own session: the terminal's Ctrl-C reaches only the supervisor, which stops parts in order.
        self.process = subprocess.Popen(self.argv, start_new_session=True,
                                        env={**os.environ, **self.env} if self.env else None)
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(sig)


def _say(message: str) -> None:
    print(f"llm-fleet | {message}", flush=True)


def run(args: argparse.Namespace) -> None:
    exe = _llm_fleet_command()
    valkey = None
    redis_url = args.redis_url
    if redis_url is None:
        valkey = EmbeddedValkey()
        valkey.start()
        redis_url = valkey.url
        _say(f"embedded Valkey on {redis_url} (data in {valkey.data_dir})")
    models = args.models or ["smollm2-135m"]
    base_url = f"http://{args.host}:{args.port}"
    if args.gateways < 1:
        raise SystemExit("--gateways must be at least 1")
    reuse_port = ["--reuse-port"] if args.gateways > 1 else []
    gateways = [Part(f"gateway-{i}" if args.gateways > 1 else "gateway",
                     [*exe, "gateway", "--redis-url", redis_url, "--host", args.host, "--port", str(args.port),
                      *reuse_port]) for i in range(args.gateways)]
    worker_flags = [flag for m in models for flag in ("--model", m)]
    if args.catalogue:
        worker_flags += ["--catalogue", args.catalogue]
    # No --worker-id: each process (a restarted one too) gets a fresh id, so the jobs a killed
    # worker held belong to a consumer whose heartbeat is gone, and are reclaimed.
    first_port = args.port + 1 if args.worker_http_port is None else args.worker_http_port
    devices = gpu_groups(args, models)
    count = len(devices) if devices else (args.workers or 1)
    workers = [Part(f"worker-{i}", [*exe, "worker", "--redis-url", redis_url, *worker_flags, "--http-host", args.host,
                                    "--http-port", str(first_port + i if first_port else 0)],
                    env={"CUDA_VISIBLE_DEVICES": devices[i], **_NCCL_ENV} if devices else None)
               for i in range(count)]
    if devices:
        _say("GPUs: " + ", ".join(f"worker-{i} on {group}" for i, group in enumerate(devices)))
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    started = time.monotonic()
    for part in [*gateways, *workers]:
        part.start()
    _say(f"{'gateway' if len(gateways) == 1 else f'{len(gateways)} gateways'} on {base_url}; "
         f"{len(workers)} worker(s) loading {', '.join(models)} ...")
    if first_port:
        _say(f"metrics: {base_url}/metrics (gateway), http://{args.host}:{first_port}/metrics"
             f"{f' .. :{first_port + len(workers) - 1}' if len(workers) > 1 else ''} (workers)")
    ready = False
    bar = load_bar(f"loading {', '.join(models)}")
    try:
        while not stopping:
            if not ready:
                advance(bar, _load_fraction(redis_url))
            if not ready and _is_ready(base_url):
                ready = True
                bar.close()
                _say(f"ready in {time.monotonic() - started:.1f}s. Point a client at {base_url}")
                _say(f"  playground: {base_url}/   console: {base_url}/console   (in a browser)")
                _say(f"  curl -s {base_url}/v1/generate -d '{{\"prompt\": \"Hello, how are you?\", "
                     f"\"max_tokens\": 32}}'")
                _say(f"  then: curl -s {base_url}/v1/requests/<request_id>   |   OpenAI: {base_url}/v1   |   "
                     f"WebSocket: ws://{args.host}:{args.port}/ws/generate   |   Ctrl-C stops the fleet")
            elif not ready and time.monotonic() - started > args.ready_timeout:
                _say(f"not ready after {args.ready_timeout:.0f}s; still waiting (see the logs above)")
                started = time.monotonic()
            for part in [*gateways, *workers]:
                if not part.alive() and not stopping:
                    code = part.process.returncode if part.process else None
                    part.restarts += 1
                    _say(f"{part.name} exited ({code}); restarting (restart #{part.restarts})")
                    time.sleep(min(5.0, 0.5 * part.restarts))
                    part.start()
            time.sleep(0.2)
    finally:
        bar.close()
        _say("stopping: workers finish their jobs first ...")
        _stop_all(workers, timeout_s=60.0)
        _stop_all(gateways, timeout_s=10.0)
        if valkey is not None:
            valkey.stop()
        _say("stopped")


def gpu_groups(args: argparse.Namespace, models: list[str]) -> list[str]:
    """CUDA_VISIBLE_DEVICES of each worker under --gpus (none without it): consecutive groups of
    --gpus-per-worker, by default the largest tensor_parallel_size among the served models."""
    if not args.gpus:
        return []
    gpus = _visible_gpus() if args.gpus == "all" else [g.strip() for g in args.gpus.split(",") if g.strip()]
    per_worker = args.gpus_per_worker
    if per_worker is None:
        catalogue = load_catalogue(args.catalogue)
        per_worker = max(int(catalogue[m].options.get("tensor_parallel_size", 1)) if m in catalogue else 1
                         for m in models)
    if per_worker < 1 or not gpus or len(gpus) % per_worker:
        raise SystemExit(f"--gpus: {len(gpus)} GPU(s) do not split into groups of {per_worker}")
    groups = [",".join(gpus[i:i + per_worker]) for i in range(0, len(gpus), per_worker)]
    if args.workers is not None and args.workers != len(groups):
        raise SystemExit(f"--workers {args.workers} does not match --gpus: {len(groups)} group(s) of {per_worker}")
    return groups


def _visible_gpus() -> list[str]:
    """The GPUs NVML sees (respecting CUDA_VISIBLE_DEVICES where set)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        return [g for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g]
    import pynvml  # only here: a CPU fleet never needs it

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise SystemExit(f"--gpus all: no GPU visible ({exc})") from exc
    try:
        return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
    finally:
        pynvml.nvmlShutdown()


def _llm_fleet_command() -> list[str]:
    """The console script of this installation (beside this Python), else the one on PATH, else
    this Python running the CLI module (a source checkout on PYTHONPATH, not installed)."""
    beside = Path(sys.executable).parent / "llm-fleet"
    found = str(beside) if beside.exists() else shutil.which("llm-fleet")
    return [found] if found is not None else [sys.executable, "-m", "common.cli"]


def interrupt(process: subprocess.Popen, timeout_s: float) -> None:
    """Stop a running `llm-fleet up` as Ctrl-C does (workers drain first); kill it past timeout_s."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _stop_all(parts: list[Part], timeout_s: float) -> None:
    for part in parts:
        part.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for part in parts:
        if part.process is None:
            continue
        try:
            part.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            part.process.kill()
            part.process.wait()


def _load_fraction(redis_url: str) -> float:
    """How far the workers' model loads are (0..1), from their heartbeats; 0 while Redis is not up."""
    async def read() -> float:
        redis = connect(redis_url, timeout_s=1.0)
        try:
            return load_fraction(await fleet_state.live_workers(redis))
        finally:
            await redis.aclose()

    try:
        return asyncio.run(read())
    except REDIS_UNAVAILABLE:
        return 0.0


def _is_ready(base_url: str) -> bool:
    """The gateway is up and a worker has a model ready."""
    try:
        with urllib.request.urlopen(f"{base_url}/ready", timeout=2) as response:
            return bool(json.load(response).get("models"))
    except (urllib.error.URLError, OSError, ValueError):
        return False
