"""Prometheus /metrics on the gateway and on a worker: scrape, send traffic, scrape again."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TEST_MODEL, Fleet, StartFleet

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(http: aiohttp.ClientSession, url: str) -> Samples:
    async with http.get(url) as response:
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def run_requests(fleet: Fleet, count: int, max_tokens: int) -> None:
    for i in range(count):
        request_id = await fleet.submit(prompt=f"metrics {i}", max_tokens=max_tokens, ignore_eos=True)
        assert (await fleet.wait_done(request_id))["status"] == "completed"


async def test_gateway_metrics_count_requests_and_read_the_queues(start_fleet: StartFleet) -> None:
    fleet = await start_fleet(max_outstanding=2)
    url = fleet.base_url + "/metrics"
    before = await scrape(fleet.http, url)
    await run_requests(fleet, 3, max_tokens=4)
    assert (await fleet.post("/v1/generate", {"model": "nope", "prompt": "x"}))[0] == 404
    after = await scrape(fleet.http, url)
    accepted = {"route": "/v1/generate", "method": "POST", "status": "202"}
    assert value(after, "llm_fleet_http_requests_total", **accepted) - value(
        before, "llm_fleet_http_requests_total", **accepted) == 3
    assert value(after, "llm_fleet_http_requests_total", route="/v1/generate", method="POST", status="404") == 1
    polls = {"route": "/v1/requests/{request_id}", "method": "GET", "status": "200"}  # a template, not the id
    assert value(after, "llm_fleet_http_requests_total", **polls) >= 3
    assert value(after, "llm_fleet_workers_live") == 1
    assert value(after, "llm_fleet_model_ready_workers", model=TEST_MODEL) == 1
    assert value(after, "llm_fleet_queue_outstanding", model=TEST_MODEL) == 0

    # No worker reads now: jobs wait, the oldest ages, and the third is refused (max_outstanding=2).
    await fleet.stop_workers()
    await fleet.submit(prompt="waits", max_tokens=4)
    await fleet.submit(prompt="waits too", max_tokens=4)
    assert (await fleet.post("/v1/generate", {"model": TEST_MODEL, "prompt": "refused"}))[0] == 429
    await asyncio.sleep(0.3)
    queued = await scrape(fleet.http, url)
    assert value(queued, "llm_fleet_queue_outstanding", model=TEST_MODEL) == 2
    assert value(queued, "llm_fleet_queue_waiting", model=TEST_MODEL) == 2
    assert value(queued, "llm_fleet_queue_oldest_waiting_seconds", model=TEST_MODEL) >= 0.3
    assert value(queued, "llm_fleet_admission_rejections_total", model=TEST_MODEL) == 1
    assert value(queued, "llm_fleet_http_requests_total", route="/v1/generate", method="POST", status="429") == 1
    assert value(queued, "llm_fleet_workers_live") == 0


async def test_worker_metrics_and_probes(start_fleet: StartFleet) -> None:
    fleet = await start_fleet(workers=0)
    worker = await fleet.start_worker(settings={"http_port": 0})
    await fleet.wait_ready()
    assert worker.http_port
    base = f"http://127.0.0.1:{worker.http_port}"
    async with fleet.http.get(base + "/health") as response:
        assert response.status == 200
    async with fleet.http.get(base + "/ready") as response:
        assert response.status == 200 and (await response.json())["models"] == [TEST_MODEL]

    model = {"model": TEST_MODEL}
    before = await scrape(fleet.http, base + "/metrics")
    await run_requests(fleet, 2, max_tokens=8)
    after = await scrape(fleet.http, base + "/metrics")

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("llm_fleet_generation_tokens_total", **model) == 16
    assert grew("llm_fleet_prompt_tokens_total", **model) == len("metrics 0") + len("metrics 1")  # byte tokens
    assert grew("llm_fleet_requests_finished_total", finish_reason="length", **model) == 2
    for histogram in ("llm_fleet_queue_wait_seconds", "llm_fleet_time_to_first_token_seconds",
                      "llm_fleet_inter_token_latency_seconds", "llm_fleet_e2e_request_latency_seconds"):
        assert grew(histogram + "_count", **model) == 2, histogram
    assert 0 < grew("llm_fleet_time_to_first_token_seconds_sum", **model) < grew(
        "llm_fleet_e2e_request_latency_seconds_sum", **model)
    assert value(after, "llm_fleet_kv_cache_capacity_tokens", **model) == 65536
    assert value(after, "llm_fleet_running_requests", **model) == 0
    assert value(after, "llm_fleet_model_state", state="ready", **model) == 1
    assert value(after, "llm_fleet_model_state", state="loading", **model) == 0
    assert value(after, "llm_fleet_gpu_available") == 0  # no GPU here: said, not crashed
    assert value(after, "llm_fleet_worker_info", worker_id=worker.worker_id) == 1

    await worker.unload(TEST_MODEL)
    async with fleet.http.get(base + "/ready") as response:
        assert response.status == 503 and "no model is ready" in (await response.json())["reason"]
    unloaded = await scrape(fleet.http, base + "/metrics")
    assert value(unloaded, "llm_fleet_model_state", state="ready", **model) == 0  # its series are gone
    assert value(unloaded, "llm_fleet_generation_tokens_total", **model) == value(
        after, "llm_fleet_generation_tokens_total", **model)  # counters keep their history


async def test_the_grafana_dashboard_queries_only_metrics_the_fleet_exports(start_fleet: StartFleet) -> None:
    fleet = await start_fleet(workers=0)
    worker = await fleet.start_worker(settings={"http_port": 0})
    await fleet.wait_ready()
    exported: set[str] = set()
    for url in (fleet.base_url + "/metrics", f"http://127.0.0.1:{worker.http_port}/metrics"):
        async with fleet.http.get(url) as response:
            for family in text_string_to_metric_families(await response.text()):
                exported |= {family.name + suffix for suffix in ("", "_total", "_bucket", "_count", "_sum")}
    dashboard = json.loads((Path(__file__).parent.parent / "helm/llm-fleet/files/grafana-dashboard.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"llm_fleet_[a-z0-9_]+", target["expr"])}
    assert len(dashboard["panels"]) >= 12 and len(queried) >= 20
    assert queried <= exported, sorted(queried - exported)
