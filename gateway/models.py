"""The models the fleet serves, as workers registered them in Redis (cached briefly)."""

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis

from common import fleet_state, keys
from common.affinity import EngineLoad
from common.errors import NotFound, Unavailable, Unprocessable
from common.protocol import SERVING_STATES, ModelCard, ModelState, TokenizerBundle, WorkerStatus
from gateway.tokenization import PromptEncoder

_CARDS_TTL_S = 2.0
# Which models live workers serve, read at most this often (the submit path checks it per request).
_SERVED_TTL_S = 1.0
# ...and re-read before answering 503 when older than this (at most a few reads/s for an unserved model).
_UNSERVED_RECHECK_S = 0.2


class ModelRegistry:
    def __init__(self, redis: Redis, *, queue_unserved: bool = False) -> None:
        self._redis = redis
        self._queue_unserved = queue_unserved
        self._served: tuple[int, frozenset[str]] = (0, frozenset())  # live workers, models they serve
        self._engines: dict[str, list[EngineLoad]] = {}  # model -> live engines serving it (prefix affinity)
        self._served_at = 0.0
        self._served_lock = asyncio.Lock()
        self._cards: dict[str, ModelCard] = {}
        self._cards_at = 0.0
        self._cards_lock = asyncio.Lock()
        self._encoders: dict[str, tuple[ModelCard, PromptEncoder]] = {}
        self._encoder_lock = asyncio.Lock()

    async def cards(self, *, fresh: bool = False) -> dict[str, ModelCard]:
        """The registered cards, at most `_CARDS_TTL_S` old (`fresh`: read now, for listings)."""
        if fresh or time.monotonic() - self._cards_at > _CARDS_TTL_S:
            async with self._cards_lock:  # one refresh for a burst of requests, not one each
                if fresh or time.monotonic() - self._cards_at > _CARDS_TTL_S:
                    raw = await self._redis.hgetall(keys.MODELS)
                    self._cards = {k.decode(): ModelCard.unpack(v) for k, v in raw.items()}
                    self._cards_at = time.monotonic()
        return self._cards

    async def resolve(self, name: str | None) -> ModelCard:
        cards = await self.cards()
        if name is None:
            if len(cards) == 1:
                return next(iter(cards.values()))
            if not cards:
                raise Unavailable("no model is registered yet: is a worker running?")
            raise Unprocessable(f"`model` is required; served models: {', '.join(sorted(cards))}", param="model")
        card = cards.get(name)
        if card is None:
            # Registered since the cache was filled (a worker just loaded it)? One HGET tells.
            raw = await self._redis.hget(keys.MODELS, name)
            if raw is None:
                raise NotFound(f"model {name!r} does not exist; served models: {', '.join(sorted(cards))}",
                               param="model")
            card = cards[name] = ModelCard.unpack(raw)
        return card

    async def check_served(self, card: ModelCard) -> None:
        """503 for a model that is known (a worker registered it once) but that no live worker loads or
        serves while other workers are live: an operator unloaded it, so queueing would wait forever.
        With no live worker at all, requests queue (a restart, a scale-up from zero brings workers)."""
        if self._queue_unserved:
            return
        await self._keep_fresh()
        live, served = self._served
        if live and card.name not in served:
            await self._refresh_served(_UNSERVED_RECHECK_S)  # before a 503, a fresher answer: a load may just be done
            live, served = self._served
        if live and card.name not in served:
            raise Unavailable(f"model {card.name!r} is not loaded on any of the {live} live worker(s); an operator "
                              f"can load it with POST /admin/models/{card.name}/load")

    async def engines(self, model: str) -> list[EngineLoad]:
        """The live engines (a worker with its front-end processes) serving `model` now, with their load."""
        await self._keep_fresh()
        return self._engines.get(model, [])

    async def _keep_fresh(self) -> None:
        if time.monotonic() - self._served_at > _SERVED_TTL_S and not self._served_lock.locked():
            # One refresh at a time; meanwhile other requests use the last answer (a burst of a
            # thousand requests must not become a thousand reads of every worker's heartbeat).
            await self._refresh_served(_SERVED_TTL_S)

    async def _refresh_served(self, max_age_s: float) -> None:
        async with self._served_lock:
            if time.monotonic() - self._served_at <= max_age_s:
                return  # refreshed by another request while this one waited
            workers = await self.live_workers()
            self._served = (len(workers), frozenset(name for w in workers for name, m in w.models.items()
                                                    if m["state"] in SERVING_STATES))
            self._engines = _engines_by_model(workers)
            self._served_at = time.monotonic()

    async def encoder(self, card: ModelCard) -> PromptEncoder:
        cached = self._encoders.get(card.name)
        if cached is not None and cached[0] == card:
            return cached[1]
        async with self._encoder_lock:
            cached = self._encoders.get(card.name)
            if cached is not None and cached[0] == card:
                return cached[1]
            raw = await self._redis.get(keys.tokenizer(card.name))
            if raw is None:
                raise Unavailable(f"model {card.name!r} has no tokenizer registered yet")
            # Parsing a multi-MB tokenizer takes a while: off the event loop, once per model.
            encoder = await asyncio.to_thread(PromptEncoder, TokenizerBundle.unpack(raw))
            self._encoders[card.name] = (card, encoder)
            return encoder

    async def live_workers(self) -> list[WorkerStatus]:
        return await fleet_state.live_workers(self._redis)


def _engines_by_model(workers: list[WorkerStatus]) -> dict[str, list[EngineLoad]]:
    """Per model, each engine that serves it now (not draining), its processes' loads added up."""
    loads: dict[str, dict[str, tuple[int, int]]] = {}
    for worker in workers:
        if worker.state != "serving":
            continue
        engine = worker.frontend_of or worker.worker_id
        for name, model in worker.models.items():
            if model["state"] == ModelState.READY:
                running, max_seqs = loads.setdefault(name, {}).get(engine, (0, 0))
                loads[name][engine] = (running + model["running"], max_seqs + model["max_num_seqs"])
    return {name: [EngineLoad(engine, running, max_seqs) for engine, (running, max_seqs) in sorted(engines.items())]
            for name, engines in loads.items()}
