"""A batch input file, checked line by line as it uploads (OpenAI's rules): every line a JSON object with a
unique `custom_id`, `method` POST, one of the batch endpoints as `url`, and a `body` naming the model; every
line the same endpoint and model. A bad line is a 400 naming it; past the size or line limit, a 413."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, get_args

from common.errors import BadRequest, PayloadTooLarge
from gateway.api_types import BatchEndpoint

ENDPOINTS: tuple[str, ...] = get_args(BatchEndpoint)
PART_BYTES = 1 << 20  # lines are stored in parts of about this size (gateway/file_store.py)
MAX_CUSTOM_ID = 512


@dataclass(slots=True)
class InputLine:
    custom_id: str
    url: str
    body: dict[str, Any]


def parse_line(raw: bytes, number: int) -> InputLine:
    """One line of a batch input file; a 400 naming it (1-based `number`) when it breaks a rule."""
    try:
        line = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(number, f"not valid JSON ({exc})") from exc
    if not isinstance(line, dict):
        raise _bad(number, "must be a JSON object")
    custom_id, method, url, body = line.get("custom_id"), line.get("method"), line.get("url"), line.get("body")
    if not isinstance(custom_id, str) or not 0 < len(custom_id) <= MAX_CUSTOM_ID:
        raise _bad(number, f"`custom_id` must be a string of 1 to {MAX_CUSTOM_ID} characters")
    if method != "POST":
        raise _bad(number, "`method` must be POST")
    if url not in ENDPOINTS:
        raise _bad(number, f"`url` must be one of {', '.join(ENDPOINTS)}")
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise _bad(number, "`body` must be an object with a `model`")
    return InputLine(custom_id, url, body)


@dataclass(slots=True)
class InputChecker:
    """Splits an upload into parts of whole lines, checking each line; what it learned once done."""

    max_bytes: int
    max_lines: int
    lines: int = 0
    size: int = 0
    endpoint: str = ""
    model: str = ""
    _custom_ids: set[str] = field(default_factory=set)

    async def parts(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        pending = b""
        part: list[bytes] = []
        part_size = 0
        async for chunk in chunks:
            self.size += len(chunk)
            if self.size > self.max_bytes:
                raise PayloadTooLarge(f"the file is over this gateway's limit of {self.max_bytes} bytes",
                                      param="file")
            *whole, pending = (pending + chunk).split(b"\n")
            for raw in whole:
                if raw.strip():
                    self._check(raw)
                    part.append(raw + b"\n")
                    part_size += len(raw) + 1
            if part_size >= PART_BYTES:
                yield b"".join(part)
                part, part_size = [], 0
        if pending.strip():
            self._check(pending)
            part.append(pending + b"\n")
        if part:
            yield b"".join(part)
        if not self.lines:
            raise BadRequest("the file has no lines", param="file")

    def _check(self, raw: bytes) -> None:
        self.lines += 1
        if self.lines > self.max_lines:
            raise PayloadTooLarge(f"the file has over {self.max_lines} lines, this gateway's limit per batch",
                                  param="file")
        line = parse_line(raw, self.lines)
        if line.custom_id in self._custom_ids:
            raise _bad(self.lines, f"`custom_id` {line.custom_id!r} is used by an earlier line; each must be unique")
        self._custom_ids.add(line.custom_id)
        if self.lines == 1:
            self.endpoint, self.model = line.url, line.body["model"]
        elif line.url != self.endpoint:
            raise _bad(self.lines, f"`url` is {line.url}, line 1's is {self.endpoint}: a batch has one endpoint")
        elif line.body["model"] != self.model:
            raise _bad(self.lines, f"`body.model` is {line.body['model']!r}, line 1's is {self.model!r}: "
                                   "a batch has one model")


def _bad(number: int, problem: str) -> BadRequest:
    return BadRequest(f"line {number}: {problem}", param=f"line {number}")
