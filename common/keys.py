"""Every Redis key and channel name the fleet uses, in one place.

Braces are hash tags: everything about one request (`req:{id}`, its chunk list, its channel) shares
one tag, and so does everything about one model's queue (`jobs:{model}`, its skip set). The request
scripts (common/request_store.py) touch a request's keys and its model's stream together, so they
need one primary that holds every key: a standalone Redis or Valkey (with replicas and Sentinel),
not Redis Cluster.
"""

from __future__ import annotations

CONSUMER_GROUP = "workers"  # one group per model stream
WORKERS = "workers"  # set of worker ids that have heartbeated; stale ones are pruned by readers
MODELS = "models"  # hash: served model name -> packed ModelCard
CANCELS = "cancels"  # pub/sub channel: request ids cancelled while possibly running
DEAD_LETTER_STATS = "stats:dead_letters"  # hash: model -> msgpack {count, new, newest_reason, at} (cron)
REJECTIONS = "stats:rejections"  # hash: model -> 429s (queue full) since the fleet began, from every gateway
API_KEYS = "api_keys"  # hash: sha256 of an API key -> packed ApiKey (the key itself is never stored)


def job_stream(model: str, engine: str | None = None) -> str:
    """The model's shared stream, which any worker serving it reads; with `engine`, that engine's own
    stream (prefix affinity, common/affinity.py): jobs routed to where their prefix is cached, read by
    that engine's worker processes first and by any other once they waited `affinity_wait_ms`."""
    return f"jobs:{{{model}}}" if engine is None else f"jobs:{{{model}}}:at:{engine}"


def batch_stream(model: str) -> str:
    """The model's stream of batch-class jobs (common/protocol.py Priority): read by any worker serving the
    model after every interactive stream, with slots interactive work does not use (worker/consumer.py)."""
    return f"jobs:{{{model}}}:batch"


def is_batch_stream(stream: str) -> bool:
    return stream.endswith("}:batch")


def model_of_job_stream(stream: str) -> str:
    return stream[len("jobs:{") : stream.index("}")]


def engine_of_job_stream(stream: str) -> str | None:
    _, found, engine = stream.partition("}:at:")
    return engine if found else None


def engine_streams(model: str) -> str:
    """Set of the model's engine streams (job_stream(model, engine); created by the first job routed there
    or by the engine's reader; removed by housekeeping once the engine is dead and its stream empty)."""
    return f"jobs:{{{model}}}:engines"


def waiting_engine_streams(model: str) -> str:
    """Sorted set: the engine streams with unread entries, scored by the time (ms) of the oldest one: where
    a worker with nothing else to do looks for jobs that waited too long (worker/job_reader.py), in
    one read whatever the number of engines. Added to by the enqueue script, kept by the readers."""
    return f"jobs:{{{model}}}:waiting"


def idle_nudges(model: str) -> str:
    """Stream, group `workers`, capped: an entry for each job routed to an engine's own stream. Idle workers
    block on it beside their own and the shared stream; each entry wakes one, which takes the job if it
    still waits after `affinity_wait_ms`. (Without it idle workers would have to look every few ms.)"""
    return f"jobs:{{{model}}}:nudges"


BATCH_REF_SUFFIX = "#batch"


def entry_ref(stream: str, entry_id: bytes | str) -> str:
    """How a request (`req:{id}` field `entry`) and the skip sets name a stream entry: the id for the
    shared stream, `<id>@<engine>` for an engine's own stream, `<id>#batch` for the batch stream (ids are
    only unique within a stream)."""
    entry = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    if is_batch_stream(stream):
        return entry + BATCH_REF_SUFFIX
    engine = engine_of_job_stream(stream)
    return entry if engine is None else f"{entry}@{engine}"


def stream_of_ref(model: str, ref: str) -> tuple[str, str]:
    """(stream, entry id) of an entry_ref."""
    if ref.endswith(BATCH_REF_SUFFIX):
        return batch_stream(model), ref[: -len(BATCH_REF_SUFFIX)]
    entry, _, engine = ref.partition("@")
    return job_stream(model, engine or None), entry


def prefix_blocks(model: str, engine: str) -> str:
    """Sorted set: the prefix block hashes (common/prefix_blocks.py) the engine holds in its KV cache,
    scored by when it last used each; trimmed to the engine's capacity, least recent first."""
    return f"prefix:{{{model}}}:{engine}"


def skipped_jobs(model: str, *, batch: bool = False) -> str:
    """Set of entries (entry_ref) in the model's interactive streams (`batch`: in its batch stream) that no
    worker needs to run (cancelled while queued, expired): they stay in the stream until a worker reads and
    acks them, because deleting an entry no one has read leaves the group's lag (what KEDA scales on)
    undefined. Admission counts XLEN minus these, per class."""
    return f"jobs:{{{model}}}:batch:skip" if batch else f"jobs:{{{model}}}:skip"


def skip_set_of(stream: str) -> str:
    """The skip set that names entries of this job stream."""
    return skipped_jobs(model_of_job_stream(stream), batch=is_batch_stream(stream))


def dead_letters(model: str) -> str:
    return f"dead:{{{model}}}"


def request(request_id: str) -> str:
    return f"req:{{{request_id}}}"


def request_chunks(request_id: str) -> str:
    return f"req:{{{request_id}}}:chunks"


def chunk_channel(request_id: str) -> str:
    return f"chunks:{{{request_id}}}"


def request_id_of_channel(channel: str) -> str:
    return channel[len("chunks:{") : -1]


def worker(worker_id: str) -> str:
    return f"worker:{{{worker_id}}}"


def tokenizer(model: str) -> str:
    return f"model:{{{model}}}:tokenizer"


def idempotency(owner: str, key_digest: str) -> str:
    """`Idempotency-Key` of a POST that created a request -> "<body fingerprint> <request id>" (TTL).
    Scoped by the API key's digest (`owner`, "" without keys): one caller's keys never meet another's."""
    return f"idem:{owner}:{key_digest}"


def rate_window(key_digest: str, second: int) -> str:
    return f"ratelimit:{{{key_digest}}}:{second}"


def active_requests(key_digest: str) -> str:
    return f"active:{{{key_digest}}}"


# The Files and Batches API (gateway/files_api.py, gateway/batches_api.py, gateway/batch_runner.py).
def file_meta(file_id: str) -> str:
    """Hash: a stored file's OpenAI object fields (id, bytes, filename, purpose, ...) and its owner."""
    return f"file:{{{file_id}}}"


def file_parts(file_id: str) -> str:
    """List: the file's content in parts of whole lines (up to ~1 MiB each), in order."""
    return f"file:{{{file_id}}}:parts"


def files_of(owner: str) -> str:
    """Sorted set: the file ids of an API key's digest ("" without keys), by creation time."""
    return f"files:{owner}"


def batch(batch_id: str) -> str:
    """Hash: a batch's OpenAI object fields, its owner, and its runner's progress (where the next input
    line is, counts)."""
    return f"batch:{{{batch_id}}}"


def batch_inflight(batch_id: str) -> str:
    """Hash: request id -> the input line it runs (packed), for the batch's lines in the queue now."""
    return f"batch:{{{batch_id}}}:inflight"


def batch_runner(batch_id: str) -> str:
    """String with a TTL: the gateway process that carries the batch on now (a lease it renews)."""
    return f"batch:{{{batch_id}}}:runner"


def batches_of(owner: str) -> str:
    """Sorted set: the batch ids of an API key's digest ("" without keys), by creation time."""
    return f"batches:{owner}"


ACTIVE_BATCHES = "batches:active"  # set: batches not yet in a final state (what the runners look after)
