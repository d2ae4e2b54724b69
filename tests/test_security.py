"""Hostile or careless callers: API keys and their limits, request limits, WebSocket limits,
model names that look like paths, and Redis reached with AUTH over TLS."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
from collections.abc import AsyncIterator

import aiohttp
import pytest
import trustme
import yarl

from common import api_keys, keys
from common.api_keys import ApiKey
from common.embedded_redis import EmbeddedValkey, free_port
from tests.conftest import TEST_MODEL, StartFleet, ws_collect
from tests.test_faults import assert_contiguous


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def test_with_auth_on_every_route_but_the_probes_needs_a_valid_key(start_fleet: StartFleet, redis) -> None:
    fleet = await start_fleet(auth=True, auth_cache_s=0)
    body = {"model": TEST_MODEL, "prompt": "hi", "max_tokens": 2}
    assert (await fleet.get("/health"))[0] == 200 and (await fleet.get("/ready"))[0] == 200
    status, reply, _ = await fleet.post("/v1/generate", body)
    assert status == 401 and "Bearer" in reply["error"]["message"]
    assert (await fleet.post("/v1/generate", body, headers=bearer("lf-not-a-key")))[0] == 401
    async with fleet.http.get(fleet.base_url + "/v1/models") as response:
        assert response.status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await fleet.http.ws_connect(fleet.ws_url)
    assert refused.value.status == 401

    user = await api_keys.create(redis, ApiKey(name="user"))
    status, reply, _ = await fleet.post("/v1/generate", body, headers=bearer(user))
    assert status == 202
    fleet.headers = bearer(user)
    assert (await fleet.wait_done(reply["request_id"]))["status"] == "completed"
    async with fleet.http.ws_connect(fleet.ws_url, headers=bearer(user)) as ws:
        await ws.send_json(body)
        assert (await ws.receive_json())["type"] == "accepted"

    # Stored hashed: the digest is the field, and the secret itself is nowhere in Redis.
    stored = await redis.hgetall(keys.API_KEYS)
    assert hashlib.sha256(user.encode()).hexdigest().encode() in stored
    assert all(user.encode() not in k + v for k, v in stored.items())


async def test_a_browser_passes_its_key_as_a_websocket_subprotocol(start_fleet: StartFleet, redis) -> None:
    """Browsers cannot set headers on a WebSocket: `llm-fleet, bearer.<key>` as subprotocols instead; the
    gateway answers `llm-fleet` (a browser drops a socket whose answer names none it offered)."""
    fleet = await start_fleet(auth=True, auth_cache_s=0)
    user = await api_keys.create(redis, ApiKey(name="browser"))
    for offered in (["llm-fleet"], ["llm-fleet", "bearer.lf-not-a-key"], ["llm-fleet", "bearer."]):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await fleet.http.ws_connect(fleet.ws_url, protocols=offered)
        assert refused.value.status == 401, offered
    async with fleet.http.ws_connect(fleet.ws_url, protocols=["llm-fleet", f"bearer.{user}"]) as ws:
        assert ws.protocol == "llm-fleet"
        await ws.send_json({"model": TEST_MODEL, "prompt": "hi", "max_tokens": 2})
        assert (await ws.receive_json())["type"] == "accepted"


async def test_the_pages_are_public_and_hold_themselves_to_their_own_origin(start_fleet: StartFleet) -> None:
    fleet = await start_fleet(workers=0, auth=True)
    for path, title in (("/", "llm-fleet playground"), ("/console", "llm-fleet console")):
        async with fleet.http.get(fleet.base_url + path) as response:
            assert response.status == 200 and title in await response.text()
            assert response.headers["Content-Security-Policy"].startswith("default-src 'self'")
    async with fleet.http.get(fleet.base_url + "/static/playground.js") as response:
        assert response.status == 200 and "javascript" in response.content_type
    assert (await fleet.get("/v1/fleet"))[0] == 401, "what the pages show needs a key"

    open_fleet = await start_fleet(workers=0)
    for path in ("/static/nothing.js", "/static/../common/settings.py", "/static/%2e%2e%2fgateway%2fapp.py",
                 "/static/..%2f..%2fpyproject.toml"):
        async with open_fleet.http.get(yarl.URL(open_fleet.base_url + path, encoded=True)) as response:
            assert response.status == 404, path
            assert (await response.json())["error"]["code"] == 404


async def test_admin_routes_need_an_admin_key_and_manage_keys(start_fleet: StartFleet, redis) -> None:
    fleet = await start_fleet(auth=True, auth_cache_s=0)
    admin = await api_keys.create(redis, ApiKey(name="root", admin=True))
    user = await api_keys.create(redis, ApiKey(name="user"))
    status, reply, _ = await fleet.post("/admin/keys", {"name": "x"}, headers=bearer(user))
    assert status == 403 and "not an admin key" in reply["error"]["message"]

    status, created, _ = await fleet.post("/admin/keys", {"name": "team-a", "rps": 5, "max_concurrent": 2},
                                          headers=bearer(admin))
    assert status == 201 and created["key"].startswith("lf-") and created["max_concurrent"] == 2
    assert (await fleet.post("/admin/keys", {"name": "team-a"}, headers=bearer(admin)))[0] == 422
    assert (await fleet.post("/admin/keys", {"name": "bad", "rps": -1}, headers=bearer(admin)))[0] == 422
    async with fleet.http.get(fleet.base_url + "/admin/keys", headers=bearer(admin)) as response:
        names = [k["name"] for k in (await response.json())["keys"]]
        assert names == ["root", "team-a", "user"] and "key" not in (await response.json())["keys"][0]

    body = {"model": TEST_MODEL, "prompt": "hi", "max_tokens": 2}
    assert (await fleet.post("/v1/generate", body, headers=bearer(created["key"])))[0] == 202
    async with fleet.http.delete(fleet.base_url + "/admin/keys/team-a", headers=bearer(admin)) as response:
        assert response.status == 200
    assert (await fleet.post("/v1/generate", body, headers=bearer(created["key"])))[0] == 401
    async with fleet.http.delete(fleet.base_url + "/admin/keys/team-a", headers=bearer(admin)) as response:
        assert response.status == 404


async def test_admin_routes_are_refused_while_auth_is_off(start_fleet: StartFleet) -> None:
    fleet = await start_fleet()
    status, reply, _ = await fleet.post("/admin/keys", {"name": "x"})
    assert status == 403 and "LLM_FLEET_AUTH" in reply["error"]["message"]


async def test_a_keys_request_rate_limit_answers_429_with_retry_after(start_fleet: StartFleet, redis) -> None:
    fleet = await start_fleet(auth=True, auth_cache_s=0)
    limited = await api_keys.create(redis, ApiKey(name="slow-lane", rps=2))
    statuses = []
    for _ in range(6):
        status, reply, response = await fleet.post("/v1/generate", {"model": TEST_MODEL, "prompt": "hi",
                                                                    "max_tokens": 1}, headers=bearer(limited))
        statuses.append(status)
        if status == 429:
            assert response.headers["Retry-After"] == "1" and "2 requests per second" in reply["error"]["message"]
    assert statuses.count(429) >= 2 and statuses.count(202) <= 4  # at most two one-second windows


async def test_a_keys_concurrency_limit_counts_only_unfinished_requests(start_fleet: StartFleet, redis) -> None:
    fleet = await start_fleet(auth=True, auth_cache_s=0, engine={"step_delay_ms": 20})
    key = await api_keys.create(redis, ApiKey(name="two-at-a-time", max_concurrent=2))
    body = {"model": TEST_MODEL, "prompt": "patience ", "max_tokens": 30}
    first = [(await fleet.post("/v1/generate", body, headers=bearer(key)))[1]["request_id"] for _ in range(2)]
    status, reply, _ = await fleet.post("/v1/generate", body, headers=bearer(key))
    assert status == 429 and "2 unfinished requests" in reply["error"]["message"]
    fleet.headers = bearer(key)
    for request_id in first:
        await fleet.wait_done(request_id)
    assert (await fleet.post("/v1/generate", body, headers=bearer(key)))[0] == 202


async def test_request_size_limits_are_configurable(start_fleet: StartFleet) -> None:
    fleet = await start_fleet(max_prompt_tokens=10, max_tokens_limit=50, max_body_bytes=2048)
    status, reply, _ = await fleet.post("/v1/generate", {"model": TEST_MODEL, "prompt": "x" * 11})
    assert status == 413 and "at most 10" in reply["error"]["message"]
    status, reply, _ = await fleet.post("/v1/generate", {"model": TEST_MODEL, "prompt": "x", "max_tokens": 51})
    assert status == 422 and reply["error"]["param"] == "max_tokens"
    status, reply, _ = await fleet.post("/v1/generate", {"model": TEST_MODEL, "prompt": "x" * 4000})
    assert status == 413


@pytest.mark.parametrize("model", ["../../etc/passwd", "/etc/passwd", "etc/passwd", "~/.ssh/id_rsa",
                                   "file:///etc/passwd", "smollm2-135m/../../x"])
async def test_a_model_name_can_never_reach_a_file(start_fleet: StartFleet, redis, model: str) -> None:
    fleet = await start_fleet()
    status, reply, _ = await fleet.post("/v1/generate", {"model": model, "prompt": "x"})
    assert status in (404, 422), reply
    # Nothing was enqueued for any worker to act on: no job stream exists but the served model's, empty.
    names = {key.decode() async for key in redis.scan_iter("jobs:*")}
    assert {keys.model_of_job_stream(name) for name in names} == {TEST_MODEL}
    assert all([await redis.xlen(name) == 0 for name in names if await redis.type(name) == b"stream"])


async def test_websocket_limits_streams_per_socket_idle_sockets_and_origins(start_fleet: StartFleet) -> None:
    fleet = await start_fleet(ws_max_streams_per_socket=2, ws_idle_timeout_s=0.5,
                              ws_allowed_origins=["https://app.example"], engine={"step_delay_ms": 20})
    body = {"model": TEST_MODEL, "prompt": "slow ", "max_tokens": 40}
    async with fleet.http.ws_connect(fleet.ws_url) as ws:
        await ws.send_json(body)
        await ws.send_json(body)
        await ws.send_json(body)
        replies = [await ws.receive_json() for _ in range(3)]
        refused = [r for r in replies if r["type"] == "error"]
        assert len(refused) == 1 and refused[0]["status"] == 429, replies

    async with fleet.http.ws_connect(fleet.ws_url) as ws:  # nothing in flight: closed when idle
        closing = await asyncio.wait_for(ws.receive(), 5)
        assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == aiohttp.WSCloseCode.POLICY_VIOLATION

    with pytest.raises(aiohttp.WSServerHandshakeError) as refused_origin:
        await fleet.http.ws_connect(fleet.ws_url, headers={"Origin": "https://evil.example"})
    assert refused_origin.value.status == 403
    async with fleet.http.ws_connect(fleet.ws_url, headers={"Origin": "https://app.example"}) as ws:
        await ws.send_json(body)
        assert (await ws.receive_json())["type"] == "accepted"


@contextlib.asynccontextmanager
async def tls_proxy(target_port: int, ca: trustme.CA) -> AsyncIterator[int]:
    """A TLS endpoint in front of Valkey (this Valkey build has no TLS of its own), the way
    stunnel or a cloud Redis's TLS front would be."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(client_reader, writer), pipe(reader, client_writer))

    port = free_port()
    server = await asyncio.start_server(handle, "127.0.0.1", port, ssl=context)
    try:
        yield port
    finally:
        server.close()


async def test_redis_with_auth_over_tls_works_end_to_end(start_fleet: StartFleet, tmp_path) -> None:
    server = EmbeddedValkey(data_dir=tmp_path / "valkey", password="s3cret-pw")
    server.start()
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    try:
        async with tls_proxy(server.port, ca) as tls_port:
            url = f"rediss://:s3cret-pw@127.0.0.1:{tls_port}/0?ssl_ca_certs={ca_file}&ssl_cert_reqs=required"
            fleet = await start_fleet(redis_url=url)
            assert (await fleet.wait_done(await fleet.submit(prompt="over tls ", max_tokens=9)))["text"] == "over tls "
            wrong = await start_fleet(workers=0, redis_url=f"rediss://:wrong@127.0.0.1:{tls_port}/0"
                                      f"?ssl_ca_certs={ca_file}", redis_timeout_s=0.5)
            status, reply = await wrong.get("/ready")
            assert status == 503 and "Redis" in reply["reason"]
    finally:
        server.stop()


async def test_a_request_belongs_to_the_key_that_created_it(start_fleet: StartFleet, redis) -> None:
    """Another key cannot read, cancel or attach to it (404, as for a request that does not exist);
    its own key and an admin key can."""
    fleet = await start_fleet(auth=True, engine={"step_delay_ms": 20})
    owner, other, admin = [await api_keys.create(redis, ApiKey(name=name, admin=name == "admin"))
                           for name in ("owner", "other", "admin")]
    status, reply, _ = await fleet.post("/v1/generate", {"model": TEST_MODEL, "prompt": "mine ", "max_tokens": 40},
                                        headers=bearer(owner))
    assert status == 202
    request_id = reply["request_id"]
    path = f"/v1/requests/{request_id}"

    fleet.headers = bearer(other)
    assert (await fleet.get(path))[0] == 404
    assert (await fleet.delete(path))[0] == 404
    async with fleet.http.ws_connect(fleet.ws_url, headers=bearer(other)) as ws:
        await ws.send_json({"type": "attach", "request_id": request_id, "last_seq": 0})
        assert (await ws.receive_json())["status"] == 404
        await ws.send_json({"type": "cancel", "request_id": request_id})
        assert (await ws.receive_json())["status"] == 404
    fleet.headers = bearer(admin)
    assert (await fleet.get(path))[1]["status"] in ("queued", "running")
    fleet.headers = bearer(owner)
    done = await fleet.wait_done(request_id)
    assert done["status"] == "completed" and done["text"] == "mine " * 8
    async with fleet.http.ws_connect(fleet.ws_url, headers=bearer(owner)) as ws:
        await ws.send_json({"type": "attach", "request_id": request_id, "last_seq": 0})
        assert assert_contiguous((await ws_collect(ws, {request_id}))[request_id]) == done["text"]


async def test_made_up_keys_do_not_evict_the_cached_real_ones(start_fleet: StartFleet, redis) -> None:
    """A flood of invalid keys must not push a valid key out of the cache (every request would go to
    Redis again): after 10,001 made-up keys the real one is still served from the cache, even with
    its record gone from Redis."""
    fleet = await start_fleet(auth=True, auth_cache_s=300)
    key = await api_keys.create(redis, ApiKey(name="real"))
    fleet.headers = bearer(key)
    assert (await fleet.get("/v1/models"))[0] == 200
    authenticator = fleet.gateway.auth
    for i in range(10_001):
        with contextlib.suppress(Exception):
            await authenticator.authenticate(f"Bearer lf-made-up-{i}")
    await redis.delete(keys.API_KEYS)
    assert (await fleet.get("/v1/models"))[0] == 200
