"""Continuing a job another worker started: the output already delivered becomes prompt.

A reclaimed (its worker died) or handed-back (SIGTERM) job keeps its chunks in Redis. The
next worker runs prompt + the token ids already emitted, for the tokens still owed, and
publishes from the next seq: the client's stream goes on with no gap and no duplicate.
"""

from __future__ import annotations

import dataclasses

from common.protocol import Chunk, Job
from worker.engines.base import EngineRequest


def emitted_token_ids(delivered: list[Chunk]) -> list[int]:
    return [token for chunk in delivered for token in chunk.token_ids or ()]


def engine_request(job: Job, emitted: list[int]) -> EngineRequest | None:
    """What to ask the engine for; None when nothing is owed (the worker died between the
    last token and the final chunk: the job just needs finishing)."""
    params = job.params
    if not emitted:
        return EngineRequest(job.request_id, job.prompt_token_ids, params)
    remaining = params.max_tokens - len(emitted)
    if remaining <= 0:
        return None
    params = dataclasses.replace(params, max_tokens=remaining, min_tokens=max(0, params.min_tokens - len(emitted)))
    return EngineRequest(job.request_id, job.prompt_token_ids + emitted, params, resumed_tokens=len(emitted))
