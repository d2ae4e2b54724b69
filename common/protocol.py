"""Messages that cross Redis between gateway and worker, packed with msgpack.

One definition per message, so the two sides cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Self

import msgpack


class RequestStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATUSES = frozenset({RequestStatus.COMPLETED, RequestStatus.FAILED, RequestStatus.CANCELLED})


class Priority(StrEnum):
    """A request's class. Workers take interactive work first; batch work runs in the slots left and
    yields them when interactive work waits (worker/consumer.py). Each class has its own stream and its
    own admission cap, so a batch backlog never refuses an interactive request."""

    INTERACTIVE = "interactive"
    BATCH = "batch"


class FinishReason(StrEnum):
    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    CANCELLED = "cancelled"
    ERROR = "error"


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


class Packed:
    """Mixin: dataclass <-> msgpack bytes. Unknown fields from a newer peer are ignored.

    Fields hold only msgpack-native values (str, int, float, lists, dicts), so packing is a
    shallow dict of the fields: `dataclasses.asdict` deep-copies every token-id list, which was
    the worker's top cost per chunk on the GPU machine."""

    def pack(self) -> bytes:
        return msgpack.packb({name: getattr(self, name) for name in _field_names(type(self))})

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        names = _field_names(cls)
        return cls(**{k: v for k, v in unpack(data).items() if k in names})


@dataclass(slots=True)
class SamplingParams(Packed):
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    # vLLM's extensions, honoured by every engine: benchmarks rely on them.
    ignore_eos: bool = False
    min_tokens: int = 0
    # Logit shaping, as vLLM does it (the test engine, which echoes, ignores them): repetition_penalty over
    # prompt and output tokens (> 1 discourages), presence/frequency penalties over output tokens (OpenAI's),
    # then top_k (0: off) and min_p (0: off) before top_p.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    # Token ids that end the output like an end-of-sequence token (not emitted; min_tokens applies, ignore_eos
    # does not), and OpenAI's logit_bias: token id (a string, as in its JSON) -> added to its logit.
    stop_token_ids: list[int] = field(default_factory=list)
    logit_bias: dict[str, float] = field(default_factory=dict)
    # Log-probabilities, as vLLM reports them (of the model's raw distribution, before any penalty or
    # temperature): None asks for none; k >= 0 for each output token its own and its k most likely
    # alternatives (`logprobs`), for each prompt token the same (`prompt_logprobs`, completions' `echo`).
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # OpenAI's response_format when it constrains the output ({"type": "json_object"}, or "json_schema" with its
    # {"json_schema": {"name", "schema", ...}}): the engine's grammar keeps every token inside it.
    response_format: dict[str, Any] | None = None


@dataclass(slots=True)
class Job(Packed):
    """One generation request as it sits in `jobs:{model}`. The prompt is already tokenized."""

    request_id: str
    model: str
    prompt_token_ids: list[int]
    sampling: dict[str, Any]  # SamplingParams as a dict, so the job stays one flat msgpack map
    enqueued_at: float
    priority: str = Priority.INTERACTIVE

    @property
    def is_batch(self) -> bool:
        return self.priority == Priority.BATCH

    @property
    def params(self) -> SamplingParams:
        return SamplingParams(**self.sampling)

    @property
    def token_budget(self) -> int:
        """KV tokens this job can occupy at most: prompt plus every token it may generate."""
        return len(self.prompt_token_ids) + int(self.sampling["max_tokens"])


# One token's log-probability: [its logprob, [[token id, logprob], ...]], the list as vLLM's: the token itself
# first, then the k most likely others, most likely first (k entries if the token is among the k most likely,
# else k + 1). Lists, not objects: a chunk stays one flat msgpack map.
TokenLogprob = list[Any]


@dataclass(slots=True)
class Chunk(Packed):
    """A coalesced piece of output on `chunks:{id}` and in `req:{id}:chunks`; seq starts at 1.

    The last chunk of a request carries `finish_reason` (and usage, and `error` when failed).
    """

    seq: int
    text: str
    token_ids: list[int] | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    cached_tokens: int | None = None  # of the prompt, from the engine's prefix cache (the last chunk)
    # Asked for in the job's sampling: one TokenLogprob per token of token_ids, and in the first chunk of a
    # request one per prompt token (None for the first, which has nothing before it).
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @classmethod
    def merged(cls, chunks: list[Chunk]) -> Chunk:
        """Consecutive chunks as one: all their text and tokens, the last one's seq and ending."""
        if len(chunks) == 1:
            return chunks[0]
        last = chunks[-1]
        token_ids = [t for c in chunks for t in c.token_ids or ()] if any(c.token_ids for c in chunks) else None
        logprobs = [lp for c in chunks for lp in c.logprobs or ()] if any(c.logprobs for c in chunks) else None
        return cls(seq=last.seq, text="".join(c.text for c in chunks), token_ids=token_ids,
                   finish_reason=last.finish_reason, prompt_tokens=last.prompt_tokens,
                   completion_tokens=last.completion_tokens, error=last.error, cached_tokens=last.cached_tokens,
                   logprobs=logprobs, prompt_logprobs=next((c.prompt_logprobs for c in chunks if c.prompt_logprobs),
                                                          None))


@dataclass(slots=True)
class ModelCard(Packed):
    """What the gateway needs to know about a served model; published by workers in `models`."""

    name: str
    engine: str
    max_model_len: int
    # Tokens per block of the engine's prefix cache (0: it caches no prefixes): the gateway hashes prompts
    # in blocks of this size to route them to where they are cached (common/affinity.py).
    prefix_block_size: int = 0
    # SamplingParams fields this engine cannot honour: a request that sets one gets a 400 saying so.
    unsupported: list[str] = field(default_factory=list)
    # How the model writes tool calls in its own words (gateway/tool_parsers.py; "" for none): what chat
    # requests with tools and tool_choice "auto" need. From the catalogue (options.tool_call_parser).
    tool_call_parser: str = ""


@dataclass(slots=True)
class TokenizerBundle(Packed):
    """The model's tokenizer, shipped through Redis so the gateway needs no model files."""

    tokenizer_json: str
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None


class ModelState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADING = "unloading"  # stopped reading; finishing or handing back its jobs, then freed


# States in which a worker counts as serving a model: requests for it may be queued.
SERVING_STATES = frozenset({ModelState.LOADING, ModelState.READY})


@dataclass(slots=True)
class WorkerModelStatus:
    state: str
    progress: float = 0.0  # 0..1 while loading
    error: str | None = None
    kv_capacity_tokens: int = 0
    kv_used_tokens: int = 0
    running: int = 0
    running_batch: int = 0  # of `running`, batch-class jobs
    max_num_seqs: int = 0
    # What the engine itself reports (None where it does not say): vLLM's scheduler counts.
    engine_running: int | None = None
    engine_waiting: int | None = None
    engine_kv_usage: float | None = None


@dataclass(slots=True)
class WorkerStatus(Packed):
    """The heartbeat a worker writes to `worker:{id}` with a TTL."""

    worker_id: str
    host: str
    pid: int
    state: str  # starting | serving | draining
    started_at: float
    heartbeat_at: float
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> WorkerModelStatus as dict
    # {"available": bool, "reason"?: str, "devices"?: [{index, name, memory_used_bytes, ...}]}
    gpu: dict[str, Any] = field(default_factory=dict)
    tokens_out: int = 0  # output tokens generated since the process started (rates: diff two beats)
    catalogue: list[str] = field(default_factory=list)  # models this worker may load (admin load checks it)
    frontend_of: str = ""  # a front-end process of this worker's model (worker/frontends.py); no control jobs
