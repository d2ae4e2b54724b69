"""Tool calls a model writes in its own words (tool_choice "auto"), parsed as vLLM parses them for the model
family. A catalogue entry names its model's parser (`options.tool_call_parser`); the card carries it to the
gateway. One family so far: "hermes" (Hermes, Qwen 2.5/3 and the models trained on their format), whose calls
are `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` after any text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass


@dataclass(slots=True)
class ParsedCalls:
    content: str | None  # the text around the calls (None when there is none)
    calls: list[tuple[str, str]]  # (function name, arguments as JSON text)


class HermesParser:
    start = "<tool_call>"
    _CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)

    def parse(self, text: str) -> ParsedCalls:
        calls = []
        for body in self._CALL.findall(text):
            try:
                call = json.loads(body)
                calls.append((str(call["name"]), json.dumps(call.get("arguments", {}))))
            except (ValueError, TypeError, KeyError):
                continue  # not a call after all: left in the text
        if not calls:
            return ParsedCalls(text, [])
        content = text[:text.index(self.start)].strip()
        return ParsedCalls(content or None, calls)

    def streamable(self, text: str) -> int:
        """How much of `text` may go out as content now: all of it up to where a call begins, or could."""
        at = text.find(self.start)
        if at >= 0:
            return at
        for keep in range(min(len(self.start) - 1, len(text)), 0, -1):  # a partial "<tool_call" at the end
            if self.start.startswith(text[-keep:]):
                return len(text) - keep
        return len(text)


PARSERS = {"hermes": HermesParser}
