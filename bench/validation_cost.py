"""What checking a request body costs the gateway, per request: the typed pydantic models it uses
(gateway/api_types.py) against msgspec (the other library the issue names) on the same chat request, and
beside them what the gateway does anyway for that request (tokenizing its rendered chat).

    python bench/validation_cost.py      # msgspec is measured if it is installed (pip install msgspec)

The msgspec Struct covers the same fields with the same bounds, but not the checks pydantic runs as
validators (exactly one of two fields, top_logprobs needs logprobs): it is a lower bound for msgspec.
"""

from __future__ import annotations

import json
import sys
import timeit
from pathlib import Path
from typing import Annotated, Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gateway.api_types import ChatBody
from worker.engines.echo import byte_tokenizer

BODY = {"model": "smollm2-135m", "messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a short poem about the sea, the sky and the long road home. " * 4}],
    "max_tokens": 256, "temperature": 0.7, "top_p": 0.95, "stop": ["\n\n"], "seed": 7, "stream": True,
    "stream_options": {"include_usage": True}, "presence_penalty": 0.1, "logprobs": True, "top_logprobs": 2}
RAW = json.dumps(BODY).encode()


try:
    import msgspec
except ImportError:
    msgspec = None

if msgspec is not None:
    class MsgMessage(msgspec.Struct, forbid_unknown_fields=True):
        role: Literal["system", "user", "assistant", "tool"]
        content: str
        name: str | None = None

    class MsgStreamOptions(msgspec.Struct, forbid_unknown_fields=True):
        include_usage: bool = False
        continuous_usage_stats: bool = False

    class MsgChat(msgspec.Struct, forbid_unknown_fields=True):
        messages: Annotated[list[MsgMessage], msgspec.Meta(min_length=1)]
        model: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")] | None = None
        max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
        temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] = 1.0
        top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
        stop: str | Annotated[list[str], msgspec.Meta(max_length=8)] | None = None
        seed: Annotated[int, msgspec.Meta(ge=0)] | None = None
        stream: bool = False
        stream_options: MsgStreamOptions | None = None
        presence_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] = 0.0
        frequency_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] = 0.0
        logprobs: bool = False
        top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None


def per_call_us(fn: Any, number: int = 20_000) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main() -> None:
    rows = [("json.loads + ChatBody.model_validate (the gateway's path)",
             per_call_us(lambda: ChatBody.model_validate(json.loads(RAW)))),
            ("ChatBody.model_validate_json", per_call_us(lambda: ChatBody.model_validate_json(RAW))),
            ("json.loads + ChatBody + .request() (the job's fields)",
             per_call_us(lambda: ChatBody.model_validate(json.loads(RAW)).request()))]
    if msgspec is not None:
        decode = msgspec.json.Decoder(MsgChat).decode
        rows.append(("msgspec.json.Decoder(Chat).decode (same fields, no validators)",
                     per_call_us(lambda: decode(RAW))))
    else:
        rows.append(("msgspec (not installed)", float("nan")))
    tokenizer = byte_tokenizer()
    text = "".join(m["content"] for m in BODY["messages"])
    rows.append(("for scale: tokenizing the chat's text (byte tokenizer, one call)",
                 per_call_us(lambda: tokenizer.encode(text), number=5_000)))
    print(f"request body: {len(RAW)} bytes\n")
    print("| what | us per request |\n|---|---|")
    for name, us in rows:
        print(f"| {name} | {us:.1f} |")


if __name__ == "__main__":
    main()
