"""What every engine offers the worker: per-request output streams, abort, real capacity."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from common.protocol import ModelCard, SamplingParams, TokenizerBundle, TokenLogprob

ProgressCallback = Callable[[float], None]


@dataclass(slots=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # A continuation: the last `resumed_tokens` prompt tokens are this request's own earlier
    # output (see worker/continuation.py). Engines may use them as detokenization context.
    resumed_tokens: int = 0
    # After the first output (always at once), at least this many tokens per output where the engine can
    # hand them over in pieces (vLLM: one output object per request per step is its front-end's main
    # per-step cost). 1: every token as made, for requests somebody may be streaming.
    output_every: int = 1


# Nobody streams a batch job (its output is written every batch_flush_interval_ms): its tokens in pieces.
BATCH_OUTPUT_EVERY = 16


@dataclass(slots=True)
class EngineOutput:
    """New text since the previous output of the same request; finish_reason on the last one."""

    request_id: str
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    # Prompt tokens served from the engine's prefix cache (said once, by engines that know; else 0).
    cached_tokens: int | None = None
    # When the request asked (SamplingParams.logprobs / prompt_logprobs): one per token of token_ids, and the
    # prompt's on the request's first output (common.protocol.TokenLogprob).
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass(slots=True)
class EngineStats:
    """What the engine itself reports (None where it does not say), for the heartbeat."""

    running: int | None = None
    waiting: int | None = None
    kv_usage: float | None = None  # fraction of the KV cache in use


class Engine(ABC):
    card: ModelCard
    tokenizer: TokenizerBundle
    kv_capacity_tokens: int  # the most prompt+output tokens the engine holds at once
    kv_block_size: int = 1  # KV is allocated in blocks of this many tokens
    max_num_seqs: int  # the most sequences it decodes at once
    # Prefix caches reported by the engine itself (vLLM's KV cache events, worker/kv_events.py) rather than
    # recorded by the worker per job started (worker/prefix_recorder.py); the endpoint to subscribe to, in
    # the process that started the engine (its front-ends have none: one follower per engine).
    reports_prefix_events: bool = False
    prefix_events_endpoint: str | None = None

    @abstractmethod
    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Yield outputs until one carries a finish_reason (also after abort). Stopping the
        iteration early (the consumer is cancelled) drops the request and frees its KV."""

    @abstractmethod
    def abort(self, request_id: str) -> None:
        """Stop generating; the stream ends with finish_reason=cancelled and its KV is freed."""

    def stats(self) -> EngineStats:
        return EngineStats()

    def attach_info(self, index: int) -> dict[str, Any]:
        """What front-end process `index` needs to reach this engine (see worker/frontends.py)."""
        raise ValueError(f"the {self.card.engine} engine cannot be shared by several front-ends")

    @property
    def dead_error(self) -> str | None:
        """Why the engine can serve nothing more (its process died, ...); None while healthy."""
        return None

    @abstractmethod
    async def close(self) -> None: ...
