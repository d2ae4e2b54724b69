"""Soak: does the fleet hold steady for half an hour of mixed traffic while workers restart?

Runs `llm-fleet up --workers 2` (test engine) on its own embedded Valkey and, for --minutes, keeps
--concurrency clients busy with a mix: WebSocket streams (exact text checked), OpenAI SSE streams,
submit-then-poll, cancels after the first chunk, and sockets dropped mid-stream (their requests
must end cancelled). A worker is restarted every --restart-every-s (SIGTERM and SIGKILL in turn;
`llm-fleet up` starts a new one). Every --sample-s: the RSS of the gateway, the workers and Valkey,
Redis `used_memory`, and the p50/p99 latency of the window. The table shows growth from the end of
warm-up to the end (the target: <= 10% for every process and Redis; 0 lost; p99 flat).

`--idle-sockets N` instead opens N idle WebSockets on one gateway and reports its memory per socket.

    python bench/soak.py --minutes 30 --out bench/results/.../soak.json
    python bench/soak.py --idle-sockets 10000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.local_fleet import MODEL, start_test_fleet, wait_ready
from common.embedded_redis import EmbeddedValkey, free_port
from common.fleet import interrupt

KINDS = ("ws", "sse", "poll", "cancel", "drop")
WEIGHTS = (4, 2, 2, 1, 1)


def echo(prompt: str, max_tokens: int) -> str:
    return (prompt * (max_tokens // len(prompt) + 1))[:max_tokens]


@dataclass
class Tally:
    done: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    lost: int = 0  # did not end as it must (wrong text, not cancelled, an error)
    errors: list[str] = field(default_factory=list)
    window: list[float] = field(default_factory=list)  # latencies of complete requests since the last sample

    def fail(self, what: str) -> None:
        self.lost += 1
        if len(self.errors) < 20:
            self.errors.append(what)


class Clients:
    def __init__(self, base_url: str, tally: Tally) -> None:
        self.base = base_url
        self.ws_url = base_url.replace("http", "ws", 1) + "/ws/generate"
        self.tally = tally
        self.n = 0

    def body(self, max_tokens: int) -> dict:
        self.n += 1
        return {"model": MODEL, "prompt": f"soak {self.n:07d} ", "max_tokens": max_tokens}

    async def run(self, http: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        while not stop.is_set():
            kind = random.choices(KINDS, WEIGHTS)[0]
            started = time.monotonic()
            try:
                ok = await getattr(self, kind)(http)
            except (aiohttp.ClientError, TimeoutError, ConnectionError, KeyError) as exc:
                ok = False
                self.tally.fail(f"{kind}: {exc!r}")
            if ok:
                self.tally.done[kind] += 1
                if kind in ("ws", "sse", "poll"):
                    self.tally.window.append(time.monotonic() - started)

    async def ws(self, http: aiohttp.ClientSession) -> bool:
        body = self.body(random.randint(20, 120))
        async with http.ws_connect(self.ws_url) as ws:
            await ws.send_json(body)
            text = []
            while True:
                message = await ws.receive_json(timeout=60)
                if message["type"] == "chunk":
                    text.append(message["text"])
                elif message["type"] == "done":
                    return self._check("ws", "".join(text), body)
                elif message["type"] == "error":
                    return self._refused("ws", message)

    async def sse(self, http: aiohttp.ClientSession) -> bool:
        body = {**self.body(random.randint(20, 120)), "stream": True}
        async with http.post(f"{self.base}/v1/completions", json=body) as response:
            if response.status != 200:
                return self._refused("sse", {"status": response.status})
            text = []
            async for line in response.content:
                if line.startswith(b"data: {"):
                    event = json.loads(line[6:])
                    text.extend(c["text"] for c in event.get("choices", []))
            return self._check("sse", "".join(text), body)

    async def poll(self, http: aiohttp.ClientSession) -> bool:
        body = self.body(random.randint(20, 120))
        async with http.post(f"{self.base}/v1/generate", json=body) as response:
            if response.status != 202:
                return self._refused("poll", {"status": response.status})
            request_id = (await response.json())["request_id"]
        state = await self._until_over(http, request_id)
        return self._check("poll", state["text"], body) if state else False

    async def cancel(self, http: aiohttp.ClientSession) -> bool:
        async with http.ws_connect(self.ws_url) as ws:
            await ws.send_json(self.body(400))
            request_id = (await ws.receive_json(timeout=60))["request_id"]
            await ws.receive_json(timeout=60)  # a first chunk
            await ws.send_json({"type": "cancel", "request_id": request_id})
        return await self._ends_cancelled(http, request_id, "cancel")

    async def drop(self, http: aiohttp.ClientSession) -> bool:
        async with http.ws_connect(self.ws_url) as ws:
            await ws.send_json(self.body(400))
            request_id = (await ws.receive_json(timeout=60))["request_id"]
            await ws.receive_json(timeout=60)
        # The socket closed mid-stream: its request is cancelled (it did not outlive the socket).
        return await self._ends_cancelled(http, request_id, "drop")

    async def _until_over(self, http: aiohttp.ClientSession, request_id: str) -> dict | None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            async with http.get(f"{self.base}/v1/requests/{request_id}") as response:
                state = await response.json()
            if state.get("status") in ("completed", "failed", "cancelled"):
                return state
            await asyncio.sleep(0.2)
        self.tally.fail(f"{request_id}: unfinished after 120 s")
        return None

    async def _ends_cancelled(self, http: aiohttp.ClientSession, request_id: str, kind: str) -> bool:
        state = await self._until_over(http, request_id)
        if state is None:
            return False
        if state["status"] != "cancelled":
            self.tally.fail(f"{kind} {request_id}: ended {state['status']}, not cancelled")
            return False
        return True

    def _check(self, kind: str, text: str, body: dict) -> bool:
        if text != echo(body["prompt"], body["max_tokens"]):
            self.tally.fail(f"{kind}: wrong text for {body['prompt']!r}")
            return False
        return True

    def _refused(self, kind: str, reply: dict) -> bool:
        self.tally.fail(f"{kind}: refused {reply}")
        return False


def fleet_processes(fleet: subprocess.Popen, valkey: EmbeddedValkey) -> dict[str, psutil.Process]:
    parts = {}
    for child in psutil.Process(fleet.pid).children():
        try:
            command = " ".join(child.cmdline())
        except psutil.Error:  # a worker just killed (a zombie until its supervisor reaps it)
            continue
        if " gateway " in command:
            parts["gateway"] = child
        elif " worker " in command:
            parts[f"worker-{len([p for p in parts if p.startswith('worker')])}"] = child
    assert valkey.process is not None
    parts["valkey"] = psutil.Process(valkey.process.pid)
    return parts


async def sample(fleet: subprocess.Popen, valkey: EmbeddedValkey, redis: aioredis.Redis, tally: Tally,
                 started: float) -> dict:
    rss = {}
    for name, process in fleet_processes(fleet, valkey).items():
        try:
            rss[name] = round(process.memory_info().rss / 2**20, 1)
        except psutil.Error:
            rss[name] = None
    window, tally.window = sorted(tally.window), []
    return {"t_min": round((time.monotonic() - started) / 60, 2), "rss_mb": rss,
            "redis_used_mb": round((await redis.info("memory"))["used_memory"] / 2**20, 2),
            "requests": sum(tally.done.values()), "lost": tally.lost,
            "p50_s": round(statistics.median(window), 3) if window else None,
            "p99_s": round(window[int(0.99 * (len(window) - 1))], 3) if window else None}


async def restarts(fleet: subprocess.Popen, valkey: EmbeddedValkey, every_s: float, stop: asyncio.Event,
                   events: list[str], started: float) -> None:
    sig = signal.SIGTERM
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), every_s)
            return
        except TimeoutError:
            pass
        workers = [p for name, p in fleet_processes(fleet, valkey).items() if name.startswith("worker")]
        if workers:
            victim = random.choice(workers)
            victim.send_signal(sig)
            events.append(f"{(time.monotonic() - started) / 60:5.1f} min {sig.name} worker {victim.pid}")
            sig = signal.SIGKILL if sig == signal.SIGTERM else signal.SIGTERM


async def soak(args: argparse.Namespace) -> dict:
    valkey = EmbeddedValkey()
    valkey.start()
    port = free_port()
    # Finished results kept --result-ttl-s: Redis reaches its steady size once the warm-up outlasts it.
    fleet = start_test_fleet(port, valkey.url, workers=args.workers, step_ms=args.step_ms,
                             env={"LLM_FLEET_RESULT_TTL_S": str(args.result_ttl_s)})
    base_url = f"http://127.0.0.1:{port}"
    redis = aioredis.from_url(valkey.url)
    tally, samples, events = Tally(), [], []
    try:
        await wait_ready(base_url)
        stop = asyncio.Event()
        started = time.monotonic()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=180)) as http:
            clients = [asyncio.create_task(Clients(base_url, tally).run(http, stop)) for _ in range(args.concurrency)]
            restarter = asyncio.create_task(restarts(fleet, valkey, args.restart_every_s, stop, events, started))
            while time.monotonic() - started < args.minutes * 60:
                await asyncio.sleep(args.sample_s)
                samples.append(await sample(fleet, valkey, redis, tally, started))
                print(json.dumps(samples[-1]), flush=True)
            stop.set()
            await asyncio.gather(*clients, restarter)
    finally:
        await redis.aclose()
        interrupt(fleet, 90)
        valkey.stop()
    return {"minutes": args.minutes, "concurrency": args.concurrency, "workers": args.workers,
            "done": tally.done, "lost": tally.lost, "errors": tally.errors, "events": events, "samples": samples}


def growth(samples: list[dict], warmup_min: float) -> dict[str, float | None]:
    """Percent change of each series from the first sample after warm-up to the mean of the last three
    (the workers are new processes after each restart: their series are the role's, not one pid's)."""
    steady = [s for s in samples if s["t_min"] >= warmup_min]
    if len(steady) < 4:
        return {}
    first = steady[0]
    series = {name: [s["rss_mb"].get(name) for s in steady] for name in first["rss_mb"]}
    series["redis used_memory"] = [s["redis_used_mb"] for s in steady]
    out = {}
    for name, values in series.items():
        start, tail = values[0], [v for v in values[-3:] if v is not None]
        out[name] = round(100 * (statistics.mean(tail) / start - 1), 1) if start and tail else None
    p99 = [s["p99_s"] for s in steady if s["p99_s"] is not None]
    out["p99 latency"] = round(100 * (statistics.mean(p99[-3:]) / statistics.mean(p99[:3]) - 1), 1) if p99 else None
    return out


async def idle_sockets(count: int) -> dict:
    valkey = EmbeddedValkey()
    valkey.start()
    port = free_port()
    fleet = start_test_fleet(port, valkey.url, step_ms=5.0)
    base_url = f"http://127.0.0.1:{port}"
    sockets = []
    try:
        await wait_ready(base_url)
        gateway = fleet_processes(fleet, valkey)["gateway"]
        before = gateway.memory_info().rss
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            for start in range(0, count, 500):
                sockets += await asyncio.gather(*(http.ws_connect(base_url.replace("http", "ws") + "/ws/generate")
                                                  for _ in range(min(500, count - start))))
            await asyncio.sleep(2.0)
            after = gateway.memory_info().rss
            async with http.ws_connect(base_url.replace("http", "ws") + "/ws/generate") as ws:  # still serving
                await ws.send_json({"model": MODEL, "prompt": "still here ", "max_tokens": 8})
                served = (await ws.receive_json(timeout=30))["type"] == "accepted"
            for ws in sockets:
                await ws.close()
    finally:
        interrupt(fleet, 30)
        valkey.stop()
    return {"sockets": len(sockets), "gateway_rss_before_mb": round(before / 2**20, 1),
            "gateway_rss_after_mb": round(after / 2**20, 1), "kib_per_socket": round((after - before) / len(sockets)
                                                                                    / 1024, 1),
            "served_a_request_meanwhile": served}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--step-ms", type=float, default=10.0, help="test engine: delay per decoding step")
    parser.add_argument("--restart-every-s", type=float, default=180.0)
    parser.add_argument("--sample-s", type=float, default=30.0)
    parser.add_argument("--warmup-min", type=float, default=3.0)
    parser.add_argument("--result-ttl-s", type=int, default=60, help="how long finished results stay in Redis")
    parser.add_argument("--idle-sockets", type=int, help="measure memory per idle WebSocket instead")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if args.idle_sockets:
        result = asyncio.run(idle_sockets(args.idle_sockets))
        print("| idle WebSockets | gateway RSS before MB | after MB | KiB per socket | served meanwhile |")
        print("|---|---|---|---|---|")
        print(f"| {result['sockets']} | {result['gateway_rss_before_mb']} | {result['gateway_rss_after_mb']} | "
              f"{result['kib_per_socket']} | {result['served_a_request_meanwhile']} |")
    else:
        result = asyncio.run(soak(args))
        result["growth_pct"] = growth(result["samples"], args.warmup_min)
        print(f"\nsoak: {args.minutes:g} min, {args.concurrency} clients, {args.workers} workers (test engine, "
              f"{args.step_ms:g} ms/step), a worker restarted every {args.restart_every_s:g} s")
        print(f"requests by kind: {result['done']}; lost: {result['lost']}")
        print("| series | growth after warm-up (%) |")
        print("|---|---|")
        for name, pct in result["growth_pct"].items():
            print(f"| {name} | {pct} |")
        for error in result["errors"]:
            print("  error:", error)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
