"""JSON shapes the native API returns."""

from __future__ import annotations

from common.protocol import Chunk, TokenLogprob
from gateway.api_responses import NativeLogprob, RequestState, Usage


def _float(state: dict[str, str], name: str) -> float | None:
    value = state.get(name)
    return float(value) if value else None


def request_view(request_id: str, state: dict[str, str], chunks: list[Chunk]) -> RequestState:
    created, started = _float(state, "created_at"), _float(state, "started_at")
    first, finished = _float(state, "first_token_at"), _float(state, "finished_at")
    view: RequestState = {
        "request_id": request_id,
        "status": state.get("status"),  # type: ignore[typeddict-item]  # a stored request always has one
        "model": state.get("model"),
        "text": "".join(c.text for c in chunks),
        "finish_reason": state.get("finish_reason") or None,
        "usage": {
            "prompt_tokens": int(state.get("prompt_tokens", 0)),
            "completion_tokens": int(state.get("completion_tokens", 0)),
            "prompt_tokens_details": {"cached_tokens": int(state.get("cached_tokens", 0))},
        },
        "error": state.get("error") or None,
        "last_seq": int(state.get("seq", 0)),
        "timings": {
            "created_at": created,
            "queue_s": None if started is None or created is None else round(started - created, 4),
            "ttft_s": None if first is None or created is None else round(first - created, 4),
            "total_s": None if finished is None or created is None else round(finished - created, 4),
        },
    }
    if any(c.logprobs for c in chunks):
        view["logprobs"] = native_logprobs([t for c in chunks for t in c.token_ids or ()],
                                           [lp for c in chunks for lp in c.logprobs or ()])
    return view


def native_logprobs(token_ids: list[int], logprobs: list[TokenLogprob]) -> list[NativeLogprob]:
    """Each output token's logprob and its most likely alternatives', by token id."""
    return [{"token_id": token, "logprob": finite(logprob),
             "top_logprobs": [{"token_id": i, "logprob": finite(lp)} for i, lp in top]}
            for token, (logprob, top) in zip(token_ids, logprobs, strict=False)]


def finite(logprob: float) -> float:
    """JSON has no -Infinity: a token the engine rules out gets vLLM's stand-in."""
    return max(logprob, -9999.0)


def usage_of(chunk: Chunk) -> Usage:
    """A final chunk's usage, OpenAI's shape (with `prompt_tokens_details.cached_tokens`)."""
    prompt, completion = chunk.prompt_tokens or 0, chunk.completion_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": chunk.cached_tokens or 0}}
