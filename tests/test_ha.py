"""Redis high availability: a primary, a replica and three Sentinels (real valkey-server processes);
the fleet connects through a `redis+sentinel://` URL, the primary is SIGKILLed under load, Sentinel
promotes the replica, and every request that got its 202 (or WebSocket `accepted`) completes with
its exact text: nothing lost, no gap, no chunk twice at a WebSocket client."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from common import api_keys
from common.api_keys import ApiKey
from common.embedded_redis import EmbeddedValkeyHA
from common.redis_conn import SentinelUrl, connect
from tests.conftest import TEST_MODEL, Fleet, StartFleet
from tests.test_control_plane import OTHER, catalogue
from tests.test_faults import assert_contiguous, echo
from tests.test_status import status as cli_status

# Heartbeats outlive a failover (a few seconds without a primary): no live worker counts as dead.
_WORKER_ENV = {"LLM_FLEET_HEARTBEAT_TTL_S": "10"}


@pytest.fixture
async def valkey_ha(request: pytest.FixtureRequest) -> AsyncIterator[EmbeddedValkeyHA]:
    group = EmbeddedValkeyHA(replicas=getattr(request, "param", 1))
    await asyncio.to_thread(group.start)
    yield group
    await asyncio.to_thread(group.stop)


def test_sentinel_urls_parse_and_bad_ones_say_why() -> None:
    url = SentinelUrl.parse("rediss+sentinel://:s3cret@h1:26379,h2:26380,[::1]/fleet/2?sentinel_password=x")
    assert url is not None
    assert url.sentinels == [("h1", 26379), ("h2", 26380), ("::1", 26379)] and url.service == "fleet"
    assert (url.db, url.password, url.username, url.tls) == (2, "s3cret", None, True)
    assert url.options == {"sentinel_password": "x"}
    assert SentinelUrl.parse("redis+sentinel://h1/mymaster").db == 0
    assert SentinelUrl.parse("redis://localhost:6379/0") is None
    for bad in ("redis+sentinel://h1:26379", "redis+sentinel:///fleet/0", "redis+sentinel://h1/fleet/x"):
        with pytest.raises(ValueError, match="Sentinel URL is"):
            SentinelUrl.parse(bad)


async def test_writes_wait_for_a_replica_and_with_sentinel_never_go_without_one(
        valkey_ha: EmbeddedValkeyHA, start_fleet: StartFleet) -> None:
    fleet = await start_fleet(redis_url=valkey_ha.url)
    assert fleet.gateway.store.replication.acks_needed == 1
    request_id = await fleet.submit(prompt="durable ", max_tokens=8)
    replica = connect(f"redis://127.0.0.1:{valkey_ha.nodes[1].port}/0", timeout_s=1.0)
    try:  # what the 202 answered for is on the replica already
        assert await replica.hget(f"req:{{{request_id}}}", "status") is not None
    finally:
        await replica.aclose()
    assert (await fleet.wait_done(request_id))["text"] == echo("durable ", 8)

    # A plain URL to the same primary waits too, while it has a replica.
    plain = await start_fleet(workers=0, redis_url=f"redis://127.0.0.1:{valkey_ha.nodes[0].port}/0")
    assert plain.gateway.store.replication.acks_needed == 1

    # The replica is gone (as on the wrong side of a partition): with Sentinel, nothing is acknowledged.
    valkey_ha.nodes[1].kill()
    await fleet.gateway.store.replication.look()
    assert fleet.gateway.store.replication.replicas == 0 and fleet.gateway.store.replication.acks_needed == 1
    status, reply, _ = await fleet.post("/v1/generate", {"model": TEST_MODEL, "prompt": "alone ", "max_tokens": 4})
    assert status == 503 and "no replica confirmed" in reply["error"]["message"], reply
    # ... and with a plain URL, a primary without replicas is a development Redis: nothing to wait for.
    await plain.gateway.store.replication.look()
    assert plain.gateway.store.replication.acks_needed == 0


@dataclass
class Load:
    """Clients on both sides of a failover: WebSocket streams (every message kept) and submit-then-poll
    clients; a submit refused with 503 is counted (no other refusal is allowed)."""

    fleet: Fleet
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    streamed: dict[str, tuple[str, int]] = field(default_factory=dict)  # accepted: request id -> (prompt, max)
    streams: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    polled: dict[str, tuple[str, int]] = field(default_factory=dict)
    refused: list[float] = field(default_factory=list)  # when each 503 came
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self, streaming: int, polling: int) -> None:
        self.tasks += [asyncio.create_task(self._stream(f"c{i}")) for i in range(streaming)]
        self.tasks += [asyncio.create_task(self._poll(f"p{i}")) for i in range(polling)]

    def accepted(self) -> int:
        return len(self.streamed) + len(self.polled)

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)

    async def assert_every_accepted_request_completed_exactly(self) -> None:
        for request_id, (prompt, max_tokens) in self.streamed.items():
            assert assert_contiguous(self.streams[request_id]) == echo(prompt, max_tokens), request_id
        for request_id, (prompt, max_tokens) in {**self.streamed, **self.polled}.items():
            done = await self.fleet.wait_done(request_id, timeout_s=30)
            assert done["status"] == "completed" and done["text"] == echo(prompt, max_tokens), done

    async def _stream(self, name: str) -> None:
        n = 0
        try:
            async with self.fleet.http.ws_connect(self.fleet.ws_url) as ws:
                while not self.stop.is_set():
                    prompt, max_tokens = f"{name}-{n} ", 40 + n % 5 * 10
                    n += 1
                    await ws.send_json({"model": TEST_MODEL, "prompt": prompt, "max_tokens": max_tokens})
                    reply = await ws.receive_json()
                    if reply["type"] == "error":
                        assert reply["status"] == 503, reply
                        self.refused.append(time.monotonic())
                        await asyncio.sleep(0.05)
                        continue
                    request_id = reply["request_id"]
                    self.streamed[request_id] = (prompt, max_tokens)
                    messages = self.streams.setdefault(request_id, [])
                    while not messages or messages[-1]["type"] not in ("done", "error"):
                        messages.append(await asyncio.wait_for(ws.receive_json(), 30))
                        assert messages[-1].get("request_id") == request_id, messages[-1]
        except (ConnectionError, TimeoutError) as exc:  # the stream itself must not break: fail loudly
            raise AssertionError(f"client {name}: the stream broke ({exc!r})") from exc

    async def _poll(self, name: str) -> None:
        n = 0
        while not self.stop.is_set():
            prompt, max_tokens = f"{name}-{n} ", 30
            n += 1
            status, reply, _ = await self.fleet.post("/v1/generate", {"model": TEST_MODEL, "prompt": prompt,
                                                                      "max_tokens": max_tokens})
            if status == 202:
                self.polled[reply["request_id"]] = (prompt, max_tokens)
            else:
                assert status == 503, reply
                self.refused.append(time.monotonic())
            await asyncio.sleep(0.05)


async def new_primary(valkey_ha: EmbeddedValkeyHA, old: int | None) -> None:
    async with asyncio.timeout(30):
        while valkey_ha.primary_port() in (old, None):
            await asyncio.sleep(0.1)


@pytest.mark.parametrize("valkey_ha", [2], indirect=True)  # after the failover, the new primary has a replica
async def test_primary_killed_under_load_loses_nothing_accepted(valkey_ha: EmbeddedValkeyHA,
                                                                start_fleet: StartFleet) -> None:
    fleet = await start_fleet(redis_url=valkey_ha.url, workers=0, redis_timeout_s=1.0)
    for i in range(2):
        fleet.spawn_worker(f"ha-{i}", env=_WORKER_ENV, step_delay_ms=10)
    await fleet.wait_ready(timeout_s=30)
    load = Load(fleet)
    load.start(streaming=8, polling=2)
    long_request = await fleet.submit(prompt="through the failover ", max_tokens=400)  # mid-generation
    await asyncio.sleep(2.0)

    old_primary = valkey_ha.primary_port()
    before = load.accepted()
    valkey_ha.node(old_primary).kill()
    killed_at = time.monotonic()
    await new_primary(valkey_ha, old_primary)
    promoted = load.accepted()
    await asyncio.sleep(4.0)  # traffic on the new primary
    await load.finish()

    assert before >= 10 and load.accepted() - promoted >= 10, "requests accepted on both sides of the failover"
    assert load.refused, "503s while no primary was known"
    print(f"\nfailover: {len(load.streamed)} streamed + {len(load.polled)} polled accepted, {len(load.refused)} "
          f"refused with 503 over {max(load.refused) - min(load.refused):.2f} s (the first "
          f"{min(load.refused) - killed_at:+.2f} s after the kill)")
    await load.assert_every_accepted_request_completed_exactly()
    done = await fleet.wait_done(long_request, timeout_s=30)
    assert done["text"] == echo("through the failover ", 400)


async def test_a_write_no_replica_confirms_is_refused_and_withdrawn(valkey_ha: EmbeddedValkeyHA,
                                                                    start_fleet: StartFleet) -> None:
    """The replica stops answering (SIGSTOP: as if cut off from the primary): the primary would take the
    write, but it could be lost in a failover, so the client gets 503, not a 202, and the job is withdrawn.
    A generation in flight pauses and then finishes exactly once the replica is back."""
    fleet = await start_fleet(redis_url=valkey_ha.url)
    running = await fleet.submit(prompt="paused ", max_tokens=120)
    await asyncio.sleep(0.3)
    replica = valkey_ha.nodes[1].process
    assert replica is not None
    replica.send_signal(signal.SIGSTOP)
    try:
        status, reply, response = await fleet.post("/v1/generate", {"model": TEST_MODEL, "prompt": "refused ",
                                                                    "max_tokens": 4})
        assert status == 503 and "no replica confirmed" in reply["error"]["message"], reply
        withdrawn = response.headers["X-Request-Id"]
    finally:
        replica.send_signal(signal.SIGCONT)
    assert (await fleet.wait_done(withdrawn))["status"] == "cancelled", "the refused job never runs"
    assert (await fleet.wait_done(running, timeout_s=30))["text"] == echo("paused ", 120)
    assert (await fleet.wait_done(await fleet.submit(prompt="back ", max_tokens=4)))["status"] == "completed"


async def test_the_control_plane_and_the_cli_work_through_sentinel(valkey_ha: EmbeddedValkeyHA,
                                                                   start_fleet: StartFleet, tmp_path) -> None:
    """arq's control jobs (a hot load) and `llm-fleet status` on a redis+sentinel URL."""
    fleet = await start_fleet(workers=0, redis_url=valkey_ha.url, auth=True)
    admin_client = connect(valkey_ha.url, timeout_s=2.0)
    try:
        admin = await api_keys.create(admin_client, ApiKey(name="ops", admin=True))
    finally:
        await admin_client.aclose()
    fleet.headers = {"Authorization": f"Bearer {admin}"}
    await fleet.start_worker(settings={"catalogue": catalogue(tmp_path)})
    await fleet.wait_ready()
    status, reply, _ = await fleet.post(f"/admin/models/{OTHER}/load", {"wait": True}, headers=fleet.headers)
    assert status == 200 and reply["workers"][0]["ok"], reply

    snapshot = json.loads(await cli_status(valkey_ha.url, "--json", "--interval", "0.2"))
    [worker] = snapshot["workers"]
    assert set(worker["models"]) == {TEST_MODEL, OTHER}


@pytest.mark.parametrize("valkey_ha", [2], indirect=True)
async def test_a_primary_cut_off_from_its_replicas_and_sentinels_acknowledges_nothing(
        valkey_ha: EmbeddedValkeyHA, start_fleet: StartFleet) -> None:
    """A partition: the Sentinels and replicas lose the primary, the fleet does not. The old primary
    keeps taking writes for a moment, but none is acknowledged (no replica confirms it); the fleet
    learns from the Sentinels that the primary moved, follows, and every accepted request completes.
    (Simulated without a network: the primary starts requiring a password and drops the connections
    of its replicas and Sentinels, which cannot come back; the fleet's own connections stay.)"""
    fleet = await start_fleet(redis_url=valkey_ha.url, workers=0, redis_timeout_s=1.0)
    fleet.spawn_worker("part-0", env=_WORKER_ENV, step_delay_ms=10)
    await fleet.wait_ready(timeout_s=30)
    load = Load(fleet)
    load.start(streaming=4, polling=2)
    await asyncio.sleep(1.5)
    assert load.accepted() >= 5, "requests accepted before the partition"

    old = valkey_ha.primary_port()
    primary = connect(f"redis://127.0.0.1:{old}/0", timeout_s=2.0)
    try:
        await primary.config_set("requirepass", "cut-off")
        await primary.execute_command("CLIENT", "KILL", "TYPE", "replica")
        for client in await primary.client_list():  # the Sentinels' connections (Sentinel names them)
            if client.get("name", "").startswith("sentinel-"):
                await primary.execute_command("CLIENT", "KILL", "ID", client["id"])
    finally:
        await primary.aclose()
    await new_primary(valkey_ha, old)
    promoted = load.accepted()
    await asyncio.sleep(4.0)  # traffic on the new primary
    await load.finish()

    assert load.accepted() - promoted >= 10 and load.refused, "served again after the move; 503s meanwhile"
    await load.assert_every_accepted_request_completed_exactly()
