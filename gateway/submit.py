"""From a validated request to a job in the model's stream: resolve, tokenize, check, admit."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable

from common.affinity import AffinityPolicy, route_arg
from common.errors import BadRequest, Overloaded, PayloadTooLarge, Unprocessable
from common.protocol import Job, ModelCard, SamplingParams
from common.request_store import Idempotency, Replay, RequestStore
from common.settings import GatewaySettings
from gateway.api_types import GenerateRequest
from gateway.idempotency import check_replay
from gateway.models import ModelRegistry
from gateway.tokenization import PromptEncoder


def new_request_id() -> str:
    return uuid.uuid4().hex


class Submitter:
    def __init__(self, settings: GatewaySettings, store: RequestStore, registry: ModelRegistry, *,
                 on_rejected: Callable[[str], None] = lambda model: None,
                 on_routed: Callable[[str, bool], None] = lambda model, to_engine: None) -> None:
        self._settings = settings
        self._on_rejected = on_rejected  # a model's queue was full (counted in /metrics)
        self._on_routed = on_routed  # a job went to an engine's own stream (True) or the shared one
        self._affinity = AffinityPolicy(settings.affinity_load_weight, settings.affinity_queue_batches,
                                        settings.prefix_fresh_s) if settings.prefix_affinity else None
        self._store = store
        self._registry = registry

    async def prepare(self, request: GenerateRequest, request_id: str | None = None) -> Job:
        """Everything short of enqueueing: raises the 404/413/422 a bad request deserves."""
        card = await self._registry.resolve(request.model)
        await self._registry.check_served(card)
        encoder = await self._registry.encoder(card)
        if request.prompt_token_ids is not None:
            prompt_ids = request.prompt_token_ids
        elif request.prompt is not None:
            prompt_ids = await encoder.encode_prompt(request.prompt)
        else:
            prompt_ids = await encoder.encode_messages(request.messages or [], tools=request.tools)

        refused = [name for name in card.unsupported if request.sampling.get(name) not in (None, [], {})]
        if refused:
            raise BadRequest(f"model {card.name!r} runs on the {card.engine} engine, which does not support "
                             f"`{refused[0]}`", param=refused[0])
        for param, token in request.token_ids():
            if token >= (vocab := encoder.vocab_size):
                raise Unprocessable(f"`{param}` names token {token}; model {card.name!r} has {vocab} (0..{vocab - 1})",
                                    param=param)

        cap = self._settings.max_prompt_tokens
        if cap and len(prompt_ids) > cap:
            raise PayloadTooLarge(f"prompt is {len(prompt_ids)} tokens; this gateway accepts at most {cap}",
                                  param="prompt")
        if request.max_tokens is not None and request.max_tokens > self._settings.max_tokens_limit:
            raise Unprocessable(f"max_tokens={request.max_tokens} is over this gateway's limit of "
                                f"{self._settings.max_tokens_limit}", param="max_tokens")
        limit = card.max_model_len
        if len(prompt_ids) >= limit:
            raise PayloadTooLarge(
                f"prompt is {len(prompt_ids)} tokens; model {card.name!r} has a context of {limit} tokens",
                param="prompt",
            )
        room = limit - len(prompt_ids)
        max_tokens = request.max_tokens
        if max_tokens is None:
            max_tokens = min(self._settings.default_max_tokens, room)
        elif max_tokens > room:
            raise Unprocessable(
                f"max_tokens={max_tokens} does not fit: prompt is {len(prompt_ids)} tokens and model "
                f"{card.name!r} has a context of {limit} tokens (at most {room} new tokens)",
                param="max_tokens",
            )
        params = SamplingParams(max_tokens=max_tokens, **request.sampling)
        params.min_tokens = min(params.min_tokens, max_tokens)
        return Job(request_id=request_id or new_request_id(), model=card.name, prompt_token_ids=prompt_ids,
                   sampling=dataclasses.asdict(params), enqueued_at=time.time(), priority=request.priority)

    async def card(self, model: str) -> ModelCard:
        return await self._registry.resolve(model)

    async def encoder(self, model: str) -> PromptEncoder:
        """The model's tokenizer, as this gateway has it."""
        return await self._registry.encoder(await self._registry.resolve(model))

    async def enqueue(self, job: Job, *, owner: str = "", idempotency: Idempotency | None = None) -> str:
        """The id of the request now queued for this submit: the job's, or with an idempotency key seen
        before, the earlier request's."""
        cap = self._settings.max_outstanding_batch if job.is_batch else self._settings.max_outstanding
        reply = await self._store.enqueue(job, max_outstanding=cap, ttl_s=self._settings.request_ttl_s, owner=owner,
                                          idempotency=idempotency, route=await self._route(job))
        if isinstance(reply, str):
            self._on_routed(job.model, "@" in reply)
        if isinstance(reply, Replay):
            return check_replay(reply, idempotency)  # type: ignore[arg-type]
        if reply is None:
            self._on_rejected(job.model)
            raise Overloaded(
                f"model {job.model!r} is at capacity ({cap} outstanding {job.priority} requests); retry later",
                retry_after_s=self._settings.retry_after_s,
            )
        return job.request_id

    async def _route(self, job: Job) -> bytes | None:
        if self._affinity is None or job.is_batch:  # batch jobs wait in their own stream, unrouted
            return None
        card = await self._registry.resolve(job.model)
        if not card.prefix_block_size:
            return None
        return route_arg(job.model, job.prompt_token_ids, card.prefix_block_size,
                         await self._registry.engines(job.model), self._affinity)
