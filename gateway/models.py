"""The models the fleet serves, as workers registered them in Redis (cached briefly)."""

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis

from common import fleet_state, keys
from common.errors import NotFound, Unavailable, Unprocessable
from common.protocol import ModelCard, TokenizerBundle, WorkerStatus
from gateway.tokenization import PromptEncoder

_CARDS_TTL_S = 2.0
# A name missing from the cache may be a model registered since the last read: re-read, but no more often
# than this, so a client hammering an unknown name costs one HGETALL per interval, not one per request.
_MISSING_RECHECK_S = 0.2


class ModelRegistry:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._cards: dict[str, ModelCard] = {}
        self._cards_at = 0.0
        self._cards_lock = asyncio.Lock()
        self._encoders: dict[str, tuple[ModelCard, PromptEncoder]] = {}
        self._encoder_lock = asyncio.Lock()

    async def cards(self, expect: set[str] | frozenset[str] = frozenset()) -> dict[str, ModelCard]:
        """The registered cards; `expect` names models the caller knows exist (a worker serves them, a
        client asked for them), which triggers an early re-read when the cache lacks one."""
        if self._stale(expect):
            async with self._cards_lock:  # one refresh for a burst of requests, not one each
                if self._stale(expect):
                    raw = await self._redis.hgetall(keys.MODELS)
                    self._cards = {k.decode(): ModelCard.unpack(v) for k, v in raw.items()}
                    self._cards_at = time.monotonic()
        return self._cards

    def _stale(self, expect: set[str] | frozenset[str]) -> bool:
        age = time.monotonic() - self._cards_at
        return age > _CARDS_TTL_S or (age > _MISSING_RECHECK_S and not expect <= self._cards.keys())

    async def resolve(self, name: str | None) -> ModelCard:
        cards = await self.cards({name} if name else frozenset())
        if name is None:
            if len(cards) == 1:
                return next(iter(cards.values()))
            if not cards:
                raise Unavailable("no model is registered yet: is a worker running?")
            raise Unprocessable(f"`model` is required; served models: {', '.join(sorted(cards))}", param="model")
        card = cards.get(name)
        if card is None:
            raise NotFound(f"model {name!r} does not exist; served models: {', '.join(sorted(cards))}",
                           param="model")
        return card

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
