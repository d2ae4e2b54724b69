"""The generation request, checked field by field; every problem is a clear 400/422."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from common.errors import BadRequest, Unprocessable
from common.protocol import Priority, SamplingParams

MAX_STOP_STRINGS = 8
MAX_SEED = 2**63 - 1
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
_ROLES = frozenset({"system", "user", "assistant", "tool"})
# The request fields that become the job's SamplingParams (max_tokens is checked against the context apart).
SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams)) - {"max_tokens"}
GENERATE_FIELDS = frozenset({"model", "prompt", "messages", "max_tokens", "priority"}) | SAMPLING_FIELDS
MAX_TOP_K = 1 << 20
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 300  # OpenAI's limit


@dataclass(slots=True)
class GenerateRequest:
    model: str | None
    prompt: str | None
    messages: list[dict[str, Any]] | None
    max_tokens: int | None
    # The checked sampling fields (sampling_fields): common.protocol.SamplingParams less max_tokens.
    sampling: dict[str, Any] = field(default_factory=dict)
    priority: Priority = Priority.INTERACTIVE

    def token_ids(self) -> list[tuple[str, int]]:
        """(field, token id) of every token id the request names: the gateway checks them against the model."""
        return [*(("stop_token_ids", t) for t in self.sampling.get("stop_token_ids", ())),
                *(("logit_bias", int(t)) for t in self.sampling.get("logit_bias", {}))]


def parse_json_object(raw: str | bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


def reject_unknown(body: dict[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise Unprocessable(f"unknown field(s): {', '.join(unknown)}", param=unknown[0])


def model_field(body: dict[str, Any]) -> str | None:
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not _MODEL_NAME.match(model)):
        raise Unprocessable("`model` must be a model name", param="model")
    return model


def strict_bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise Unprocessable(f"`{name}` must be a boolean", param=name)
    return value


def parse_generate(body: dict[str, Any], *, also_allowed: frozenset[str] = frozenset()) -> GenerateRequest:
    reject_unknown(body, GENERATE_FIELDS | also_allowed)
    model = model_field(body)

    prompt, messages = prompt_or_messages(body)
    if prompt is not None and not prompt:
        raise Unprocessable("`prompt` must be a non-empty string", param="prompt")

    return GenerateRequest(model=model, prompt=prompt, messages=messages,
                           max_tokens=int_field(body, "max_tokens", minimum=1), sampling=sampling_fields(body),
                           priority=priority_field(body))


def priority_field(body: dict[str, Any]) -> Priority:
    """`priority`: a class name ("interactive", "batch"), or as vLLM's own integer field (lower runs sooner):
    0 or less is interactive, above 0 batch."""
    value = body.get("priority")
    if value is None:
        return Priority.INTERACTIVE
    if isinstance(value, str) and value in Priority.__members__.values():
        return Priority(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return Priority.BATCH if value > 0 else Priority.INTERACTIVE
    raise Unprocessable(f"`priority` must be one of {', '.join(Priority)} or an integer (vLLM's: above 0 is "
                        "batch)", param="priority")


def prompt_or_messages(body: dict[str, Any]) -> tuple[str | None, list[dict[str, Any]] | None]:
    """Exactly one of a string `prompt` or chat `messages`, checked."""
    prompt, messages = body.get("prompt"), body.get("messages")
    if (prompt is None) == (messages is None):
        raise Unprocessable("send exactly one of `prompt` or `messages`", param="prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise Unprocessable("`prompt` must be a string", param="prompt")
    if messages is not None:
        check_messages(messages)
    return prompt, messages


def sampling_fields(body: dict[str, Any]) -> dict[str, Any]:
    """temperature, top_p, stop, seed, the penalties, and vLLM's ignore_eos/min_tokens/top_k/min_p,
    checked the same way for every front end (SAMPLING_FIELDS)."""
    return {
        "temperature": number_field(body, "temperature", 1.0, low=0.0, high=2.0),
        "top_p": number_field(body, "top_p", 1.0, low=0.0, high=1.0, low_open=True),
        "stop": stop_field(body.get("stop")),
        "seed": int_field(body, "seed", minimum=0, maximum=MAX_SEED),
        "ignore_eos": strict_bool(body, "ignore_eos", False),
        "min_tokens": int_field(body, "min_tokens", minimum=0) or 0,
        "presence_penalty": number_field(body, "presence_penalty", 0.0, low=-2.0, high=2.0),
        "frequency_penalty": number_field(body, "frequency_penalty", 0.0, low=-2.0, high=2.0),
        "repetition_penalty": number_field(body, "repetition_penalty", 1.0, low=0.0, high=2.0, low_open=True),
        "top_k": max(0, int_field(body, "top_k", minimum=-1, maximum=MAX_TOP_K) or 0),  # -1 (vLLM's "off") is 0
        "min_p": number_field(body, "min_p", 0.0, low=0.0, high=1.0),
        "stop_token_ids": stop_token_ids_field(body.get("stop_token_ids")),
        "logit_bias": logit_bias_field(body.get("logit_bias")),
    }


def stop_token_ids_field(value: Any) -> list[int]:
    if value is None:
        return []
    if (not isinstance(value, list) or len(value) > MAX_STOP_TOKEN_IDS
            or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)):
        raise Unprocessable(f"`stop_token_ids` must be a list of at most {MAX_STOP_TOKEN_IDS} token ids",
                            param="stop_token_ids")
    return value


def logit_bias_field(value: Any) -> dict[str, float]:
    """OpenAI's map of token id (a string) -> bias in [-100, 100]."""
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise Unprocessable(f"`logit_bias` must map at most {MAX_LOGIT_BIAS} token ids to biases", param="logit_bias")
    for token, bias in value.items():
        if not token.isdigit() or isinstance(bias, bool) or not isinstance(bias, int | float) or not (
                math.isfinite(bias) and -100 <= bias <= 100):
            raise Unprocessable("`logit_bias` maps token ids (\"123\") to numbers from -100 to 100",
                                param="logit_bias")
    return {str(int(token)): float(bias) for token, bias in value.items()}


def check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise Unprocessable("`messages` must be a non-empty list", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content", "name"}:
            raise Unprocessable(f"messages[{i}] must be an object with `role` and `content`", param="messages")
        role = message.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise Unprocessable(f"messages[{i}].role must be one of {sorted(_ROLES)}", param="messages")
        if not isinstance(message.get("content"), str):
            raise Unprocessable(f"messages[{i}].content must be a string", param="messages")


def int_field(body: dict[str, Any], name: str, *, minimum: int, maximum: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise Unprocessable(f"`{name}` must be an integer", param=name)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise Unprocessable(f"`{name}` must be {bound}, got {value}", param=name)
    return value


def number_field(body: dict[str, Any], name: str, default: float, *, low: float, high: float,
            low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise Unprocessable(f"`{name}` must be a number", param=name)
    if value > high or value < low or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise Unprocessable(f"`{name}` must be in {interval}, got {value}", param=name)
    return float(value)


def stop_field(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stops)):
        raise Unprocessable(f"`stop` must be a non-empty string or a list of at most {MAX_STOP_STRINGS}",
                            param="stop")
    return stops
