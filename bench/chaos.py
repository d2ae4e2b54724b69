"""Chaos benchmark: does the fleet lose, repeat or skip anything while its parts die?

Runs `llm-fleet up --workers N` on its own embedded Valkey (AOF on) and sends REQUESTS requests,
half over WebSockets (streamed, seqs checked at the client, re-attached with last_seq after a
disconnect) and half submit-then-poll. With --chaos, meanwhile: a random worker is SIGKILLed
every KILL_EVERY seconds (the supervisor restarts it), the gateway is SIGKILLed once (a third
of the way in) and Valkey is restarted once (two thirds in). Without, the same load runs calm.
`--faults oom,pause` makes Redis say no instead: it refuses writes (maxmemory OOM) 5 times for
0.5 s and pauses its clients (CLIENT PAUSE) twice for 1 s; after the last fault a probe request
measures how soon the fleet serves again.

Every client retries a submit that timed out (5 s) or failed, with an Idempotency-Key (the
WebSocket generate with `idempotency_key`): `requests created` counts the requests the fleet
holds at the end, which must be one per client request, never a second one.

The test engine (fixed per-token delay) makes the expected text of every request known, so
the client checks it exactly; `--model smollm2-135m` runs the real CPU model (seq checks only).

    python bench/chaos.py                      # calm, then chaos; prints the table
    python bench/chaos.py --only chaos --faults oom,pause    # Redis errors instead of kills
    python bench/chaos.py --model smollm2-135m --requests 40 --concurrency 8 --max-tokens 48
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import psutil
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.local_fleet import wait_ready
from common.embedded_redis import EmbeddedValkey, free_port
from common.fleet import interrupt
from common.settings import BUILTIN_CATALOGUE

RETRYABLE = (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError)


@dataclass
class Outcome:
    completed: int = 0
    lost: int = 0  # never completed (failed, cancelled, vanished, or still unfinished at the deadline)
    wrong_text: int = 0  # completed, but not the exact expected text
    duplicated_chunks: int = 0
    submit_retries: int = 0
    requests_created: int = 0  # requests the fleet holds at the end, less the probe: one per client request
    reattaches: int = 0
    stalls: int = 0  # WebSocket streams silent for 30 s (the client re-attached)
    latencies: list[float] = field(default_factory=list)


class Client:
    def __init__(self, base_url: str, model: str, max_tokens: int, echo: bool, outcome: Outcome) -> None:
        self.base = base_url
        self.ws_url = base_url.replace("http", "ws", 1) + "/ws/generate"
        self.model = model
        self.max_tokens = max_tokens
        self.echo = echo
        self.out = outcome

    def body(self, i: int) -> tuple[dict, str | None]:
        prompt = f"request {i:04d} says hello. "
        expected = (prompt * (self.max_tokens // len(prompt) + 1))[: self.max_tokens] if self.echo else None
        body = {"model": self.model, "prompt": prompt, "max_tokens": self.max_tokens, "temperature": 0}
        return body, expected

    @staticmethod
    def idempotency_key(i: int) -> str:
        return f"chaos-{i}"

    async def polled(self, http: aiohttp.ClientSession, i: int, deadline: float) -> None:
        body, expected = self.body(i)
        started = time.monotonic()
        request_id = await self._submit(http, body, self.idempotency_key(i), deadline)
        seen = ""
        while request_id is not None and time.monotonic() < deadline:
            try:
                async with http.get(f"{self.base}/v1/requests/{request_id}") as response:
                    if response.status != 200:
                        await asyncio.sleep(0.5)
                        continue
                    state = await response.json()
            except RETRYABLE:
                await asyncio.sleep(0.5)
                continue
            if not state["text"].startswith(seen):  # what a poller saw may never change, only grow
                self.out.duplicated_chunks += 1
            seen = state["text"]
            if state["status"] in ("completed", "failed", "cancelled"):
                self._finish(state["status"] == "completed", seen, expected, started)
                return
            await asyncio.sleep(0.25)
        self.out.lost += 1

    async def streamed(self, http: aiohttp.ClientSession, i: int, deadline: float) -> None:
        body, expected = self.body(i)
        started = time.monotonic()
        request_id: str | None = None
        last_seq, text = 0, []
        while time.monotonic() < deadline:
            try:
                async with http.ws_connect(self.ws_url, heartbeat=10) as ws:
                    if request_id is None:  # a first try, or a retry of one that never said `accepted`
                        await ws.send_json({**body, "outlive_socket": True,
                                            "idempotency_key": self.idempotency_key(i)})
                    else:
                        self.out.reattaches += 1
                        await ws.send_json({"type": "attach", "request_id": request_id, "last_seq": last_seq})
                    while True:
                        try:
                            message = await ws.receive(timeout=30)
                        except TimeoutError:
                            self.out.stalls += 1  # nothing for 30 s: the stream is stuck; re-attach
                            break
                        if message.type != aiohttp.WSMsgType.TEXT:
                            break
                        event = json.loads(message.data)
                        kind = event["type"]
                        if kind == "accepted":
                            request_id = event["request_id"]
                        elif kind in ("chunk", "done"):
                            seq = event["seq"]
                            if seq <= last_seq and kind == "chunk":
                                self.out.duplicated_chunks += 1
                                continue
                            # A chunk may carry several stored pieces (a reader that fell behind, a
                            # re-attach): its seq is the last. What is missing shows in the exact text.
                            last_seq = max(last_seq, seq)
                            text.append(event.get("text", ""))
                            if kind == "done":
                                self._finish(True, "".join(text), expected, started)
                                return
                        elif kind == "error":
                            if event.get("status") == 429:
                                self.out.submit_retries += 1
                                await asyncio.sleep(1.0)
                            elif event.get("status") != 503:
                                self._finish(False, "".join(text), expected, started)
                                return
                            break  # 503: the queue was unreachable; try again shortly
            except RETRYABLE:
                pass
            await asyncio.sleep(0.5)
        self.out.lost += 1

    async def _submit(self, http: aiohttp.ClientSession, body: dict, key: str, deadline: float) -> str | None:
        while time.monotonic() < deadline:
            try:
                async with http.post(f"{self.base}/v1/generate", json=body, headers={"Idempotency-Key": key},
                                     timeout=aiohttp.ClientTimeout(total=5)) as response:
                    if response.status == 202:
                        return (await response.json())["request_id"]
                    wait = float(response.headers.get("Retry-After", 0.5))
            except RETRYABLE:
                wait = 0.5
            self.out.submit_retries += 1
            await asyncio.sleep(wait)
        return None

    def _finish(self, ok: bool, text: str, expected: str | None, started: float) -> None:
        if not ok:
            self.out.lost += 1
            return
        self.out.completed += 1
        self.out.latencies.append(time.monotonic() - started)
        if expected is not None and text != expected:
            self.out.wrong_text += 1


class Chaos:
    """Kills workers (the supervisor restarts them), the gateway once and Valkey once."""

    def __init__(self, fleet: subprocess.Popen, valkey: EmbeddedValkey, kill_every_s: float, duration_s: float,
                 faults: set[str], base_url: str, model: str) -> None:
        self.faults = faults
        self.fleet = psutil.Process(fleet.pid)
        self.valkey = valkey
        self.kill_every_s = kill_every_s
        self.duration_s = duration_s
        self.base_url = base_url
        self.model = model
        self.events: list[str] = []
        self.recovery_s: float | None = None  # last Redis fault's end to a probe request completed

    def _children(self, part: str) -> list[psutil.Process]:
        found = []
        for child in self.fleet.children():
            try:
                if part in child.cmdline():
                    found.append(child)
            except psutil.NoSuchProcess:
                pass
        return found

    async def run(self) -> None:
        await asyncio.gather(self._kills(), self._refusals())

    async def _refusals(self) -> None:
        """Redis up but saying no: OOM 5 times for 0.5 s, CLIENT PAUSE twice for 1 s, spread over the run."""
        schedule = sorted([(self.duration_s * i / 6, "oom") for i in range(1, 6) if "oom" in self.faults]
                          + [(self.duration_s * f, "pause") for f in (0.3, 0.7) if "pause" in self.faults])
        if not schedule:
            return
        started = time.monotonic()
        admin = aioredis.from_url(self.valkey.url)
        try:
            for at, fault in schedule:
                await asyncio.sleep(max(0.0, started + at - time.monotonic()))
                if fault == "oom":
                    await admin.config_set("maxmemory", 1)
                    await asyncio.sleep(0.5)
                    await admin.config_set("maxmemory", 0)
                    self.events.append(f"{time.monotonic() - started:5.1f}s Redis refused writes (OOM) for 0.5 s")
                else:
                    await admin.execute_command("CLIENT", "PAUSE", 1000, "ALL")
                    await asyncio.sleep(1.0)
                    self.events.append(f"{time.monotonic() - started:5.1f}s Redis paused its clients for 1 s")
        finally:
            await admin.aclose()
        self.recovery_s = await self._probe(time.monotonic())

    async def _probe(self, since: float) -> float | None:
        """Seconds from `since` until a fresh request completes (None: not within 60 s)."""
        body = {"model": self.model, "prompt": "probe ", "max_tokens": 4}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            while time.monotonic() - since < 60:
                try:  # one request, however often it is sent (it is not one of the clients')
                    async with http.post(f"{self.base_url}/v1/generate", json=body,
                                         headers={"Idempotency-Key": "chaos-probe"}) as response:
                        request_id = (await response.json())["request_id"] if response.status == 202 else None
                    while request_id is not None and time.monotonic() - since < 60:
                        async with http.get(f"{self.base_url}/v1/requests/{request_id}") as response:
                            if response.status == 200 and (await response.json())["status"] == "completed":
                                return round(time.monotonic() - since, 2)
                        await asyncio.sleep(0.05)
                except RETRYABLE:
                    pass
                await asyncio.sleep(0.1)
        return None

    async def _kills(self) -> None:
        if not self.faults & {"workers", "gateway", "redis"}:
            return
        started = time.monotonic()
        gateway_done = redis_done = False
        while time.monotonic() - started < self.duration_s:
            await asyncio.sleep(self.kill_every_s)
            elapsed = time.monotonic() - started
            workers = self._children("worker") if "workers" in self.faults else []
            if workers:
                victim = random.choice(workers)
                victim.send_signal(signal.SIGKILL)
                self.events.append(f"{elapsed:5.1f}s SIGKILL worker pid {victim.pid}")
            if not gateway_done and elapsed > self.duration_s / 3 and "gateway" in self.faults:
                for gateway in self._children("gateway"):
                    gateway.send_signal(signal.SIGKILL)
                    self.events.append(f"{elapsed:5.1f}s SIGKILL gateway pid {gateway.pid}")
                gateway_done = True
            if not redis_done and elapsed > 2 * self.duration_s / 3 and "redis" in self.faults:
                await asyncio.to_thread(self.valkey.stop)
                await asyncio.sleep(1.0)
                await asyncio.to_thread(self.valkey.start)
                self.events.append(f"{elapsed:5.1f}s Valkey restarted (down ~1 s)")
                redis_done = True


def start_fleet(args: argparse.Namespace, redis_url: str, port: int) -> subprocess.Popen:
    catalogue = Path(tempfile.mkdtemp()) / "catalogue.json"
    entries = {"test-echo": {"engine": "test", "options": {
        "max_model_len": 4096, "max_num_seqs": 64, "kv_cache_tokens": 65536, "step_delay_ms": args.step_ms}}}
    if args.cpu_threads:  # several CPU workers on a small machine: one torch thread pool each, not oversubscribed
        spec = BUILTIN_CATALOGUE["smollm2-135m"]
        entries["smollm2-135m"] = {"engine": spec.engine, "source": spec.source,
                                   "options": {**spec.options, "threads": args.cpu_threads}}
    catalogue.write_text(json.dumps(entries))
    log = open(args.fleet_log, "a") if args.fleet_log else subprocess.DEVNULL
    return subprocess.Popen(
        [sys.executable, "-m", "common.cli", "up", "--redis-url", redis_url, "--port", str(port),
            "--worker-http-port", "0",
         "--workers", str(args.workers), "--model", args.model, "--catalogue", str(catalogue)],
        cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.DEVNULL, stderr=log,
        env={**os.environ, "LLM_FLEET_MAX_OUTSTANDING": str(args.requests)},
    )


async def requests_created(redis_url: str) -> int:
    redis = aioredis.from_url(redis_url)
    try:
        return len([key async for key in redis.scan_iter("req:{*}", count=1000) if not key.endswith(b":chunks")])
    finally:
        await redis.aclose()


async def run_once(args: argparse.Namespace, chaos: bool) -> dict:
    valkey = EmbeddedValkey()
    valkey.start()
    port = free_port()
    fleet = await asyncio.to_thread(start_fleet, args, valkey.url, port)
    base_url = f"http://127.0.0.1:{port}"
    outcome = Outcome()
    try:
        await wait_ready(base_url, 300)
        client = Client(base_url, args.model, args.max_tokens, args.model == "test-echo", outcome)
        gate = asyncio.Semaphore(args.concurrency)
        started = time.monotonic()
        deadline = started + args.deadline_s

        async def one(i: int, http: aiohttp.ClientSession) -> None:
            async with gate:
                await (client.streamed if i % 2 == 0 else client.polled)(http, i, deadline)

        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as http:
            load = asyncio.gather(*(one(i, http) for i in range(args.requests)))
            chaos_task = None
            if chaos:
                agent = Chaos(fleet, valkey, args.kill_every, args.chaos_s, set(args.faults.split(",")), base_url,
                              args.model)
                chaos_task = asyncio.create_task(agent.run())
            await load
            wall = time.monotonic() - started
            if chaos_task is not None:
                await chaos_task  # its probe, if any, ends it
        outcome.requests_created = await requests_created(valkey.url) - (chaos and agent.recovery_s is not None)
        events = agent.events if chaos else []
        recovery_s = agent.recovery_s if chaos else None
    finally:
        interrupt(fleet, 90)
        valkey.stop()
    lat = sorted(outcome.latencies)
    result = {k: v for k, v in asdict(outcome).items() if k != "latencies"}
    result.update(mode="chaos" if chaos else "calm", requests=args.requests, wall_s=round(wall, 1),
                  p50_s=round(statistics.median(lat), 2) if lat else None,
                  p99_s=round(lat[int(0.99 * (len(lat) - 1))], 2) if lat else None, events=events,
                  faults=args.faults if chaos else "", recovery_s=recovery_s)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="test-echo")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=120)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--step-ms", type=float, default=20.0, help="test engine: delay per decoding step")
    parser.add_argument("--kill-every", type=float, default=3.0, help="seconds between worker SIGKILLs")
    parser.add_argument("--chaos-s", type=float, default=30.0, help="how long the chaos agent acts")
    parser.add_argument("--cpu-threads", type=int, help="torch threads per CPU worker (real model)")
    parser.add_argument("--deadline-s", type=float, default=300.0, help="a request unfinished by then is lost")
    parser.add_argument("--only", choices=["calm", "chaos"])
    parser.add_argument("--faults", default="workers,gateway,redis", help="which faults the chaos run injects")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--fleet-log", help="append the fleet's logs (JSON lines) to this file")
    args = parser.parse_args()
    results = [asyncio.run(run_once(args, chaos)) for chaos in (False, True)
               if args.only is None or args.only == ("chaos" if chaos else "calm")]
    print(f"\nchaos benchmark: {args.model}, {args.workers} workers, {args.requests} requests "
          f"(half WebSocket, half polled), concurrency {args.concurrency}, max_tokens {args.max_tokens}")
    print("| run | faults | completed | lost | wrong text | dup chunks | requests created | p50 s | p99 s | wall s |"
          " submit retries | re-attaches | stalls | serving again after s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['faults'] or '-'} | {r['completed']} | {r['lost']} | {r['wrong_text']} | "
              f"{r['duplicated_chunks']} | {r['requests_created']} | {r['p50_s']} | {r['p99_s']} | {r['wall_s']} | "
              f"{r['submit_retries']} | {r['reattaches']} | {r['stalls']} | {r['recovery_s'] or '-'} |")
    for r in results:
        for event in r["events"]:
            print(f"  {r['mode']}: {event}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
