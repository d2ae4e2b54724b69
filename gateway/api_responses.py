"""What the generation routes answer, typed once (TypedDicts: plain dicts at run time, nothing per token on
the hot path). The builders (gateway/openai_api.py, gateway/views.py) are typed with them, and
/openapi.json's response schemas come from them (gateway/openapi.py, through pydantic's TypeAdapter).
"""

from __future__ import annotations

from typing import Literal, NotRequired

# pydantic reads TypedDicts of typing_extensions only, before Python 3.12.
from typing_extensions import TypedDict

FinishReasonOut = Literal["stop", "length", "abort", "tool_calls"]


class CachedTokens(TypedDict):
    cached_tokens: int  # prompt tokens the engine's prefix cache held


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: CachedTokens


class CompletionLogprobs(TypedDict):
    """Completions' logprobs: per token (the prompt's first, with `echo`), its text, logprob (None for a
    prompt's first token), its alternatives (the token itself and the k most likely others) and offset."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class ChatTopLogprob(TypedDict):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(TypedDict):
    content: list[ChatTokenLogprob]


class FunctionCallOut(TypedDict):
    name: str
    arguments: str  # JSON text


class ToolCallOut(TypedDict):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class AssistantMessage(TypedDict):
    role: Literal["assistant"]
    content: str | None  # None when the answer is tool_calls
    tool_calls: NotRequired[list[ToolCallOut]]


class CompletionChoice(TypedDict):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReasonOut


class ChatChoice(TypedDict):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReasonOut


class Completion(TypedDict):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatCompletion(TypedDict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class NativeTopLogprob(TypedDict):
    token_id: int
    logprob: float


class NativeLogprob(NativeTopLogprob):
    top_logprobs: list[NativeTopLogprob]  # the token itself and the k most likely others


class NativeUsage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    prompt_tokens_details: CachedTokens


class Timings(TypedDict):
    created_at: float | None
    queue_s: float | None
    ttft_s: float | None
    total_s: float | None


class RequestState(TypedDict):
    """GET /v1/requests/{id}: a request's status, its text so far, usage and timings."""

    request_id: str
    status: Literal["queued", "running", "completed", "failed", "cancelled"]
    model: str | None
    text: str
    logprobs: NotRequired[list[NativeLogprob]]  # when the request asked for them
    finish_reason: str | None
    usage: NativeUsage
    error: str | None
    last_seq: int
    timings: Timings
