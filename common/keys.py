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


def job_stream(model: str) -> str:
    return f"jobs:{{{model}}}"


def model_of_job_stream(stream: str) -> str:
    return stream[len("jobs:{") : -1]


def skipped_jobs(model: str) -> str:
    """Set of entry ids in `jobs:{model}` that no worker needs to run (cancelled while queued, expired):
    they stay in the stream until a worker reads and acks them, because deleting an entry no one has
    read leaves the group's lag (what KEDA scales on) undefined. Admission counts XLEN minus these."""
    return f"jobs:{{{model}}}:skip"


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
