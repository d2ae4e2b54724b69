"""A chat answer read as tool calls, whole and streamed: OpenAI's `tool_calls` from what the model wrote.

Three ways a request's answer holds calls (ChatBody.tool_mode): a named function (the output, constrained
by a grammar, is that function's arguments), "required" (constrained to {"name", "arguments"} of one of the
tools) and "auto" (free text; the model family's parser, gateway/tool_parsers.py, finds the calls in it).
Streamed: a named function's arguments go out as they come; a "required" call whole at its end; under "auto"
the text streams as content up to where a call begins (or might), the calls at the end.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.api_responses import ToolCallOut
from gateway.tool_parsers import PARSERS, HermesParser


class ToolCallShape:
    def __init__(self, request_id: str, mode: str, parser: str = "") -> None:
        """`mode`: a function's name, "required" or "auto"; `parser`: for "auto", the model's tool-call parser
        (its card's tool_call_parser, one of gateway/tool_parsers.PARSERS)."""
        self._request_id = request_id
        self.mode = mode
        self._parser: HermesParser | None = PARSERS[parser]() if mode == "auto" else None
        self._text: dict[int, str] = {}  # choice -> its answer so far (required, auto)
        self._sent: dict[int, int] = {}  # choice -> how much of it went out as content (auto)

    def answer(self, index: int, text: str) -> tuple[str | None, list[ToolCallOut] | None]:
        """A whole answer: (its content, its calls); no calls when they did not parse (cut short)."""
        if self.mode == "auto":
            assert self._parser is not None
            parsed = self._parser.parse(text)
            if not parsed.calls:
                return text, None
            return parsed.content, [self._call(index, i, name, args) for i, (name, args) in enumerate(parsed.calls)]
        if self.mode != "required":
            return None, [self._call(index, 0, self.mode, text)]  # the output is the named function's arguments
        try:
            call = json.loads(text)
            return None, [self._call(index, 0, call["name"], json.dumps(call["arguments"]))]
        except (ValueError, TypeError, KeyError):
            return text, None

    def delta(self, index: int, text: str, first: bool, finished: bool) -> dict[str, Any]:
        """The `delta` of a streamed chunk of choice `index`."""
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if self.mode not in ("auto", "required"):
            if first:
                [call] = self.answer(index, text)[1] or []
                return {**delta, "content": None, "tool_calls": [{"index": 0, **call}]}
            return {**delta, "tool_calls": [{"index": 0, "function": {"arguments": text}}]}
        so_far = self._text[index] = self._text.get(index, "") + text
        if self.mode == "auto" and not finished:
            assert self._parser is not None
            ready, sent = self._parser.streamable(so_far), self._sent.get(index, 0)
            self._sent[index] = max(sent, ready)
            return {**delta, "content": so_far[sent:ready]} if ready > sent else delta
        if not finished:
            return delta
        _, calls = self.answer(index, self._text.pop(index))
        sent = self._sent.pop(index, 0)
        if calls is None:  # no call after all (or cut short before it parsed): the text, as content
            return {**delta, "content": so_far[sent:]}
        rest = so_far[sent:self._parser.streamable(so_far)] if self._parser is not None else None
        return {**delta, **({"content": rest} if rest else {}),
                "tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}

    def _call(self, choice: int, index: int, name: str, arguments: str) -> ToolCallOut:
        return {"id": f"call_{self._request_id[:20]}_{choice}_{index}", "type": "function",
                "function": {"name": name, "arguments": arguments}}
