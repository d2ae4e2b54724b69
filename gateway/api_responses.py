"""What the generation routes answer, typed once (TypedDicts: plain dicts at run time, nothing per token on
the hot path). The builders (gateway/openai_api.py, gateway/views.py) are typed with them, and
/openapi.json's response schemas come from them (gateway/openapi.py, through pydantic's TypeAdapter).
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired

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


class Accepted(TypedDict):
    """POST /v1/generate: queued; poll it at Location."""

    request_id: str
    status: Literal["queued"]
    model: str


class Tokens(TypedDict):
    """POST /tokenize."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str | None] | None


class FileObject(TypedDict):
    """OpenAI's file object (the Files API)."""

    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["batch", "batch_output"]
    status: Literal["processed"]
    expires_at: int | None
    status_details: str | None


class RequestCounts(TypedDict):
    total: int
    completed: int
    failed: int


class BatchObject(TypedDict):
    """OpenAI's batch object (the Batch API)."""

    id: str
    object: Literal["batch"]
    endpoint: str
    model: str
    errors: dict[str, Any] | None  # OpenAI's list of what failed the batch
    input_file_id: str
    completion_window: str
    status: Literal["validating", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling",
                    "cancelled"]
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, str] | None


class FileList(TypedDict):
    object: Literal["list"]
    data: list[FileObject]
    has_more: bool
    first_id: str | None
    last_id: str | None


class BatchList(TypedDict):
    object: Literal["list"]
    data: list[BatchObject]
    has_more: bool
    first_id: str | None
    last_id: str | None


ModelStateOut = Literal["loading", "ready", "failed", "unloading", "unavailable"]


class ModelOnWorker(TypedDict):
    """A model's state on one worker (its WorkerModelStatus, with the worker's id)."""

    worker_id: str
    state: ModelStateOut


class ModelObject(TypedDict):
    """A served model in GET /v1/models: OpenAI's model object, and the fleet's view of it."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int | None
    engine: str | None
    unsupported_parameters: list[str]  # sampling fields its engine cannot honour (a request with one: 400)
    tool_call_parser: str | None  # how tool_choice "auto" reads its tool calls; None: it cannot
    state: ModelStateOut
    workers: list[ModelOnWorker]


class ModelList(TypedDict):
    object: Literal["list"]
    data: list[ModelObject]


class Cancelled(TypedDict):
    """DELETE /v1/requests/{id}: the status the request ends in (a finished one keeps its own)."""

    request_id: str
    status: Literal["queued", "running", "completed", "failed", "cancelled"]
