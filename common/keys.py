"""Every Redis key and channel name the fleet uses, in one place.

Braces are Redis Cluster hash tags: everything about one request (`req:{id}`, its chunk list,
its channel) hashes to one slot, so the per-request scripts stay valid on a cluster.
"""

from __future__ import annotations

CONSUMER_GROUP = "workers"  # one group per model stream
WORKERS = "workers"  # set of worker ids that have heartbeated; stale ones are pruned by readers
MODELS = "models"  # hash: served model name -> packed ModelCard
CANCELS = "cancels"  # pub/sub channel: request ids cancelled while possibly running
DEAD_LETTER_STATS = "stats:dead_letters"  # hash: model -> msgpack {count, new, newest_reason, at} (cron)
API_KEYS = "api_keys"  # hash: sha256 of an API key -> packed ApiKey (the key itself is never stored)


def job_stream(model: str) -> str:
    return f"jobs:{{{model}}}"


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


def rate_window(key_digest: str, second: int) -> str:
    return f"ratelimit:{{{key_digest}}}:{second}"


def active_requests(key_digest: str) -> str:
    return f"active:{{{key_digest}}}"
