"""A worker's /metrics with its front-end processes' (worker/frontends.py) folded in.

Prometheus scrapes one port per worker (the chart, compose); the front-ends the worker started serve
their own /metrics on localhost ports, and each scrape of the worker reads them and adds their
per-process series (jobs, tokens, latencies, their KV budget) with a `frontend` label. Series about
the shared engine and GPU come from the worker alone, so that no sum counts the GPU twice.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

import aiohttp
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

_SCRAPE_TIMEOUT_S = 2.0


class _Families:
    """A collector that returns already-built families (to render them with prometheus_client)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def merge(own: bytes, frontends: list[tuple[str, str]], per_process: frozenset[str]) -> bytes:
    """The worker's exposition text plus each front-end's series of the `per_process` families (see
    WorkerMetrics.per_process_families), labelled `frontend`."""
    families = {family.name: family for family in text_string_to_metric_families(own.decode())}
    for label, text in frontends:
        for family in text_string_to_metric_families(text):
            if family.name not in per_process:
                continue
            target = families.get(family.name)
            if target is None:
                target = families[family.name] = Metric(family.name, family.documentation, family.type)
            target.samples.extend(Sample(s.name, {**s.labels, "frontend": label}, s.value, s.timestamp, s.exemplar)
                                  for s in family.samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families.values()))  # type: ignore[arg-type]
    return generate_latest(registry)


async def scrape(urls: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Each front-end's /metrics text by label; one that does not answer is left out of this scrape."""
    async def one(session: aiohttp.ClientSession, label: str, url: str) -> tuple[str, str] | None:
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with session.get(url) as response:
                if response.status == 200:
                    return label, await response.text()
        return None

    if not urls:
        return []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_SCRAPE_TIMEOUT_S)) as session:
        found = await asyncio.gather(*(one(session, label, url) for label, url in urls))
    return [item for item in found if item is not None]
