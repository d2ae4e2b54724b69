"""Continuing a job another worker started: the output already delivered becomes prompt.

A reclaimed (its worker died) or handed-back (SIGTERM) job keeps its chunks in Redis. The
next worker runs prompt + the token ids already emitted, for the tokens still owed, and
publishes from the next seq: the client's stream goes on with no gap and no duplicate.

Text lags tokens: a detokenizer holds back an incomplete UTF-8 character and text that may
begin a stop string, so the last chunks may carry token ids whose text the client has not
seen. The continuation restarts after the last token whose text is complete (trailing
tokens of a half character are generated again) and first sends what the client is owed of
the earlier tokens' text. Left as is: a stop string that straddles the two workers' output
is not detected (the engine checks only its own output).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from common.protocol import Chunk, Job
from worker.engines.base import BATCH_OUTPUT_EVERY, EngineRequest

Decode = Callable[[list[int]], str]


@dataclass(slots=True)
class Continuation:
    request: EngineRequest | None  # None: nothing is owed, the job only needs its final chunk
    tokens_done: int  # output tokens that count as generated already
    unsent_text: str  # text of those tokens the client has not received yet


def fresh(job: Job) -> Continuation:
    return Continuation(EngineRequest(job.request_id, job.prompt_token_ids, job.params,
                                      output_every=_output_every(job)), 0, "")


def resume(job: Job, delivered: list[Chunk], decode: Decode) -> Continuation:
    emitted = [token for chunk in delivered for token in chunk.token_ids or ()]
    if not emitted:
        return fresh(job)
    sent_text = "".join(chunk.text for chunk in delivered)
    done = len(emitted)
    while done > 0 and decode(emitted[:done]).endswith("\ufffd"):
        done -= 1  # drop the tokens of a half character: they are generated again
    full_text = decode(emitted[:done])
    unsent = full_text[len(sent_text):] if full_text.startswith(sent_text) else ""
    params = job.params
    remaining = params.max_tokens - done
    if remaining <= 0:
        return Continuation(None, done, unsent)
    # The prompt's logprobs went out with the first chunk; the earlier output's logprobs are in its chunks.
    params = dataclasses.replace(params, max_tokens=remaining, min_tokens=max(0, params.min_tokens - done),
                                 prompt_logprobs=None)
    request = EngineRequest(job.request_id, job.prompt_token_ids + emitted[:done], params, resumed_tokens=done,
                            output_every=_output_every(job))
    return Continuation(request, done, unsent)


def _output_every(job: Job) -> int:
    return BATCH_OUTPUT_EVERY if job.is_batch else 1
