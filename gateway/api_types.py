"""Every request body the gateway takes, typed once (pydantic v2).

The checks, the error that names the field (422; 400 for a parameter a route does not take), and the
request schemas of /openapi.json (gateway/openapi.py) all come from these classes. The native API, the
WebSocket's generate message and the OpenAI API share `Sampling`; each route's body says only what
differs. Validation is strict (no "5" for 5, no true for 1) and refuses NaN and infinities.

A checked body becomes a `GenerateRequest`, what the submitter (gateway/submit.py) turns into a job.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.errors import BadRequest, FleetError, Unprocessable
from common.protocol import Priority, SamplingParams
from gateway.tool_parsers import PARSERS

MAX_SEED = 2**63 - 1
MAX_TOP_K = 1 << 20
MAX_LOGPROBS = 20  # vLLM's default max_logprobs
MAX_DETOKENIZE_TOKENS = 1 << 20
MAX_CHOICES = 16

ModelName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$",
                                 description="served model name (GET /v1/models)")]
TokenId = Annotated[int, Field(ge=0)]
NonEmpty = Annotated[str, Field(min_length=1)]
LogprobCount = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]
PositiveInt = Annotated[int, Field(ge=1)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class Message(Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    name: str | None = None

    def for_template(self) -> dict[str, Any]:
        return _for_template(self.role, self.content, self.name)


def _for_template(role: str, content: str, name: str | None) -> dict[str, Any]:
    """A message as a chat template takes it (a plain dict: model_dump costs more per request)."""
    return {"role": role, "content": content} if name is None else {"role": role, "content": content, "name": name}


class Sampling(Body):
    """What shapes the output, the same on every route. The fields named as SamplingParams' become the
    job's sampling (max_tokens apart: the submitter checks it against the context)."""

    model: ModelName | None = None
    max_tokens: PositiveInt | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    stop: NonEmpty | Annotated[list[NonEmpty], Field(max_length=8)] | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0)] = 0
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0, le=2)] = 1.0
    top_k: Annotated[int, Field(ge=-1, le=MAX_TOP_K, description="0 or -1: off")] = 0
    min_p: Annotated[float, Field(ge=0, le=1)] = 0.0
    stop_token_ids: Annotated[list[TokenId], Field(max_length=64)] | None = None
    logit_bias: Annotated[dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")],
                               Annotated[float, Field(ge=-100, le=100)]],
                          Field(max_length=300, description="token id -> bias in [-100, 100]")] | None = None
    priority: Literal["interactive", "batch"] | int = Field(
        "interactive", description="the request's class; an integer as vLLM's: above 0 is batch")

    def sampling(self) -> dict[str, Any]:
        """The SamplingParams fields this body sets (logprobs come from each route's own fields)."""
        stop = self.stop if isinstance(self.stop, list) else [self.stop] if self.stop else []
        fields = self.__dict__
        values = {name: fields[name] for name in _SAMPLED}
        return {**values, "stop": stop, "top_k": max(0, self.top_k), "stop_token_ids": self.stop_token_ids or [],
                "logit_bias": {str(int(t)): b for t, b in (self.logit_bias or {}).items()}}

    def priority_class(self) -> Priority:
        if isinstance(self.priority, int):
            return Priority.BATCH if self.priority > 0 else Priority.INTERACTIVE
        return Priority(self.priority)


_SAMPLED = frozenset(f.name for f in dataclasses.fields(SamplingParams)) - {
    "max_tokens", "logprobs", "prompt_logprobs", "response_format"}  # set by each route from its own fields


class PromptOrMessages(Body):
    prompt: NonEmpty | None = None
    messages: Annotated[list[Message], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> PromptOrMessages:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of `prompt` or `messages`")
        return self


class GenerateBody(PromptOrMessages, Sampling):
    """POST /v1/generate: a prompt or chat messages, queued; poll it, or stream it over the WebSocket."""

    logprobs: LogprobCount | None = Field(None, description="each output token's logprob and this many "
                                                             "alternatives' (in the poll result and the chunks)")

    def request(self) -> GenerateRequest:
        return GenerateRequest(
            model=self.model, prompt=self.prompt, messages=_dumped(self.messages), max_tokens=self.max_tokens,
            sampling={**self.sampling(), "logprobs": self.logprobs}, priority=self.priority_class())


class WsGenerate(GenerateBody):
    """A WebSocket `generate` message: a generate body and what the socket adds."""

    type: Literal["generate"] = "generate"
    id: Any = Field(None, description="echoed in every reply to this message")
    outlive_socket: bool = False
    idempotency_key: str | None = None


class StreamOptions(Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class TextPart(Body):
    type: Literal["text"]
    text: str


class FunctionCall(Body):
    name: str
    arguments: str


class ToolCall(Body):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(Message):
    """OpenAI's message: content may also be a list of text parts (joined; the template wants one string),
    or none in an assistant's turn that called tools (`tool_calls`); a tool's answer names its call."""

    content: str | list[TextPart] | None  # type: ignore[assignment]
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as a chat template takes it. A template without tools sees an assistant's calls as the
        JSON they were written as."""
        content = self.content if isinstance(self.content, str | None) else "".join(p.text for p in self.content)
        if self.tool_calls is None and self.tool_call_id is None and content is not None:
            return _for_template(self.role, content, self.name)
        message = self.model_dump(exclude_none=True)
        if content is None:
            calls = [{"name": c.function.name, "arguments": _json_or_text(c.function.arguments)}
                     for c in self.tool_calls or ()]
            content = json.dumps(calls[0] if len(calls) == 1 else calls) if calls else ""
        return {**message, "content": content}

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("a message without `content` must be an assistant's with `tool_calls`")
        return self


def _json_or_text(arguments: str) -> Any:
    """A call's arguments as the JSON they should be; a client's text that is not JSON stays text."""
    try:
        return json.loads(arguments or "{}")
    except ValueError:
        return arguments


class FunctionDef(Body):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}},
                                       description="a JSON Schema of the arguments")
    strict: bool | None = None


class Tool(Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Body):
    name: str


class NamedToolChoice(Body):
    type: Literal["function"]
    function: NamedFunction


class TextFormat(Body):
    type: Literal["text"]


class JsonObjectFormat(Body):
    type: Literal["json_object"]


class JsonSchema(Body):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    schema_: dict[str, Any] = Field(alias="schema", description="a JSON Schema the output will validate against")
    description: str | None = None
    strict: bool | None = None


class JsonSchemaFormat(Body):
    type: Literal["json_schema"]
    json_schema: JsonSchema


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class OpenAIBody(Sampling):
    """What OpenAI's completions and chat completions share. Fields that change nothing here are taken
    with their no-op values only; another value of those (`unsupported_values`, with why) is refused like an
    unknown parameter."""

    unsupported_values: ClassVar[dict[str, str]] = {
        "best_of": "no engine here samples several candidates per choice (vLLM's v1 engine has no best_of): use n",
        "suffix": "no engine here fills in the middle",
        "service_tier": "OpenAI's processing tiers do not exist here",
        "store": "completions are not stored for distillation here (poll a request by its id instead)",
    }

    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES, description="choices, each its own job")] = 1
    max_completion_tokens: PositiveInt | None = None
    user: str | None = None
    service_tier: Literal["auto", "default"] | None = None
    store: Literal[False] | None = None
    metadata: dict[str, str] | None = None
    response_format: ResponseFormat | None = None

    def usage_wanted(self) -> StreamOptions:
        return self.stream_options or StreamOptions()

    def _request(self, *, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                 messages: list[dict[str, Any]] | None = None, logprobs: int | None = None,
                 prompt_logprobs: int | None = None) -> GenerateRequest:
        return GenerateRequest(
            model=self.model, prompt=prompt, prompt_token_ids=prompt_token_ids, messages=messages,
            max_tokens=self.max_completion_tokens or self.max_tokens, priority=self.priority_class(),
            sampling={**self.sampling(), "logprobs": logprobs, "prompt_logprobs": prompt_logprobs,
                      "response_format": None if self.response_format is None or self.response_format.type == "text"
                      else self.response_format.model_dump(by_alias=True, exclude_none=True)})


class CompletionBody(OpenAIBody):
    """POST /v1/completions. The prompt is a string or token ids (a list of one of either, too)."""

    prompt: (NonEmpty | Annotated[list[TokenId], Field(min_length=1)]
             | Annotated[list[NonEmpty], Field(min_length=1, max_length=1)]
             | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=1)])
    logprobs: LogprobCount | None = Field(None, description="each token's logprob and this many alternatives'")
    echo: bool = Field(False, description="the prompt before the completion (with its logprobs, if asked)")
    best_of: Literal[1] | None = None
    suffix: None = None

    def request(self) -> GenerateRequest:
        prompt = self.prompt[0] if isinstance(self.prompt, list) and isinstance(self.prompt[0], str | list) \
            else self.prompt
        text, ids = (prompt, None) if isinstance(prompt, str) else (None, prompt)
        return self._request(prompt=text, prompt_token_ids=ids, logprobs=self.logprobs,  # type: ignore[arg-type]
                             prompt_logprobs=self.logprobs if self.echo and self.logprobs is not None else None)


class ChatBody(OpenAIBody):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: bool = False
    top_logprobs: LogprobCount | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="with tools: \"required\" or a named function (the output is then constrained to a "
                          "call, as vLLM does); \"auto\" (the default) where the model has a tool-call parser "
                          "(GET /v1/models: tool_call_parser)")
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _checked(self) -> ChatBody:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("`top_logprobs` needs `logprobs: true`")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError("`tool_choice` needs `tools`")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in {
                t.function.name for t in self.tools or ()}:
            raise ValueError(f"`tool_choice` names {self.tool_choice.function.name!r}, not one of the `tools`")
        return self

    def forced_call(self) -> str | None:
        """A call the answer is constrained to: the one function's name (a named tool_choice), "required"
        (one call of the model's choosing), or None."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return "required" if self.tool_choice == "required" else None

    def tool_mode(self, parser: str) -> str | None:
        """How the answer is read: a forced call (forced_call), "auto" (text that may hold calls, read by the
        model's tool-call parser), or None (text)."""
        if not self.tools or self.tool_choice == "none":
            return None
        if (forced := self.forced_call()) is not None:
            return forced
        if parser not in PARSERS:
            raise BadRequest("tool_choice \"auto\" needs the model's tool-call parser, and this model has none "
                             "(its catalogue entry sets options.tool_call_parser): pass tool_choice \"required\" "
                             "or a named function", param="tool_choice")
        return "auto"

    def request(self) -> GenerateRequest:
        request = self._request(messages=[m.for_template() for m in self.messages],
                                logprobs=(self.top_logprobs or 0) if self.logprobs else None)
        calls = self.forced_call()
        if calls is not None:
            if self.response_format is not None and self.response_format.type != "text":
                raise BadRequest("send `response_format` or a tool call, not both", param="response_format")
            request.sampling["response_format"] = _tool_call_format(self.tools or [], calls)
        if self.tools and self.tool_choice != "none":
            request.tools = [t.model_dump(exclude_none=True) for t in self.tools]
        return request


def _tool_call_format(tools: list[Tool], calls: str) -> dict[str, Any]:
    """The JSON a forced tool call is written as (vLLM's way): a named function's arguments alone; for
    "required", {"name", "arguments"} of any one of the tools."""
    if calls != "required":
        [tool] = [t for t in tools if t.function.name == calls]
        schema = tool.function.parameters
    else:
        schema = {"anyOf": [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                             "properties": {"name": {"const": t.function.name}, "arguments": t.function.parameters}}
                            for t in tools]}
    return {"type": "json_schema", "json_schema": {"name": "tool_call", "schema": schema}}


class TokenizeBody(PromptOrMessages):
    """POST /tokenize, as `vllm serve` has it."""

    model: ModelName | None = None
    add_special_tokens: bool | None = Field(None, description="default: true for a prompt, false for messages "
                                                              "(the chat template writes them)")
    add_generation_prompt: bool = Field(True, description="messages only")
    return_token_strs: bool = False


class DetokenizeBody(Body):
    model: ModelName | None = None
    tokens: Annotated[list[TokenId], Field(max_length=MAX_DETOKENIZE_TOKENS)]


class ApiKeyBody(Body):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    admin: bool = False
    rps: Annotated[float, Field(ge=0, le=1e6, description="0: no limit")] = 0.0
    max_concurrent: Annotated[int, Field(ge=0, le=1_000_000, description="0: no limit")] = 0


class UnloadBody(Body):
    workers: Annotated[list[NonEmpty], Field(min_length=1)] | None = None
    wait: bool = False


class LoadBody(UnloadBody):
    replicas: Annotated[int, Field(ge=1, le=10_000)] | None = None


BatchEndpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/generate"]


class BatchBody(Body):
    input_file_id: Annotated[str, Field(min_length=1, description="an uploaded file's id")]
    endpoint: BatchEndpoint
    completion_window: str = Field(pattern=r"^[1-9][0-9]{0,5}[smh]$",
                                   description='"24h" (s, m or h; at most 7 days)')
    metadata: Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                        Field(max_length=16)] | None = None


@dataclass(slots=True)
class GenerateRequest:
    """A checked generation, whichever route it came by: what the submitter makes a job of."""

    model: str | None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    prompt_token_ids: list[int] | None = None
    max_tokens: int | None = None
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams' fields less max_tokens
    priority: Priority = Priority.INTERACTIVE
    tools: list[dict[str, Any]] | None = None  # for the chat template

    def token_ids(self) -> list[tuple[str, int]]:
        """(field, token id) of every token id the request names: the gateway checks them against the model."""
        return [*(("prompt", t) for t in self.prompt_token_ids or ()),
                *(("stop_token_ids", t) for t in self.sampling.get("stop_token_ids", ())),
                *(("logit_bias", int(t)) for t in self.sampling.get("logit_bias", {}))]


def _dumped(messages: list[Message] | None) -> list[dict[str, Any]] | None:
    return None if messages is None else [m.for_template() for m in messages]


B = TypeVar("B", bound=BaseModel)


def parse_json_object(raw: str | bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


def parse(model: type[B], body: Any, *, unknown: type[FleetError] = Unprocessable,
          invalid: type[FleetError] = Unprocessable) -> B:
    """`body` as a `model`, or the error that names the first bad field: an `invalid` (422), and for a field
    the model does not have an `unknown` (the OpenAI routes answer 400, as OpenAI does, for a parameter they
    do not take; the Batch API answers 400 for everything, as OpenAI's)."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc, unknown, invalid, getattr(model, "unsupported_values", {})) from None


def validation_error(exc: ValidationError, unknown: type[FleetError] = Unprocessable,
                     invalid: type[FleetError] = Unprocessable,
                     unsupported: dict[str, str] | None = None) -> FleetError:
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    unsupported = unsupported or {}
    refused = next((str(e["loc"][0]) for e in errors if e["loc"] and e["loc"][0] in unsupported), None)
    if refused is not None:
        return unknown(f"unsupported parameter: `{refused}` is taken only with its no-op value: {unsupported[refused]}",
                       param=refused)
    extra = [str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden" and len(e["loc"]) == 1]
    if extra:
        what = "unsupported parameter(s)" if unknown is BadRequest else "unknown field(s)"
        return unknown(f"{what}: {', '.join(sorted(extra))}", param=sorted(extra)[0])
    if errors[0]["type"] in ("model_type", "dict_type") and not errors[0]["loc"]:
        return BadRequest("body must be a JSON object")
    first = errors[0]["loc"][:1]
    if not first:  # a check of the whole body: its message names the field it is about first, in backticks
        message = errors[0]["msg"].removeprefix("Value error, ")
        named = re.search(r"`(\w+)`", message)
        return invalid(message, param=named[1] if named else None)
    # A union's members each report their own error: say them all, for the field they are about.
    same = [e for e in errors if e["loc"][:1] == first]
    path = _path(same[0]["loc"])
    reasons = "; or ".join(dict.fromkeys(e["msg"].removeprefix("Value error, ") for e in same))
    return invalid(f"`{path}`: {reasons}", param=str(first[0]))


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _path(loc: tuple[int | str, ...]) -> str:
    """("messages", 0, "role") -> "messages[0].role"; the tags pydantic adds for union members are left out."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.lower() not in _TYPE_TAGS and not any(c in part for c in "[]'(),-"):
            path += f".{part}" if path else part
    return path
