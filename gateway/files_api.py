"""OpenAI's Files API, for batch input and output: upload (multipart, `purpose=batch`, checked line by line as
it streams in: gateway/batch_input.py), list, retrieve, content, delete. A file belongs to the API key that
uploaded it (or, for a batch's output, that created the batch)."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from common.errors import BadRequest, NotFound
from gateway.auth import CALLER_KEY
from gateway.batch_input import InputChecker
from gateway.context import Gateway, may_access
from gateway.file_store import StoredFile

_MAX_FILENAME = 255


async def create_file(request: web.Request) -> web.Response:
    gateway = Gateway.of(request)
    if not request.content_type.startswith("multipart/"):
        raise BadRequest("upload the file as multipart/form-data with fields `purpose` and `file`", param="file")
    try:
        return await _upload(gateway, request)
    except (ValueError, AssertionError, aiohttp.ClientPayloadError, HttpProcessingError) as exc:  # malformed multipart
        raise BadRequest(f"the multipart body cannot be read: {exc}", param="file") from exc


async def _upload(gateway: Gateway, request: web.Request) -> web.Response:
    reader = await request.multipart()
    purpose: str | None = None
    stored: StoredFile | None = None
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise BadRequest("nested multipart bodies are not supported", param="file")
        if part.name == "purpose":
            purpose = (await part.text()).strip()
            if purpose != "batch":
                raise BadRequest(f"`purpose` {purpose!r} is not supported; this fleet stores files for `batch`",
                                 param="purpose")
        elif part.name == "file" and stored is None:
            stored = await _store_upload(gateway, request, part)
        else:
            await part.release()
    if stored is None:
        raise BadRequest("the upload has no `file` field", param="file")
    if purpose is None:
        await gateway.files.delete(stored)
        raise BadRequest("the upload has no `purpose` field", param="purpose")
    await gateway.files.publish(stored)
    return web.json_response(stored.to_openai())


async def _store_upload(gateway: Gateway, request: web.Request, part: BodyPartReader) -> StoredFile:
    checker = InputChecker(max_bytes=gateway.settings.max_file_bytes, max_lines=gateway.settings.batch_max_lines)

    async def chunks():
        while chunk := await part.read_chunk(1 << 16):
            yield chunk

    file_id, size = await gateway.files.write_parts(checker.parts(chunks()))
    caller = request.get(CALLER_KEY)
    return StoredFile(id=file_id, bytes=size, created_at=int(time.time()), filename=(part.filename or "upload.jsonl")[
        :_MAX_FILENAME], purpose="batch", owner=caller.digest if caller else "", lines=checker.lines,
        endpoint=checker.endpoint, model=checker.model)


async def list_files(request: web.Request) -> web.Response:
    gateway = Gateway.of(request)
    limit, after = page_query(request)
    files, more = await gateway.files.page(_owner(request), limit=limit, after=after)
    purpose = request.query.get("purpose")
    return list_response([f.to_openai() for f in files if purpose is None or f.purpose == purpose], more)


async def get_file(request: web.Request) -> web.Response:
    return web.json_response((await file_for(request, request.match_info["file_id"])).to_openai())


async def file_content(request: web.Request) -> web.StreamResponse:
    gateway = Gateway.of(request)
    stored = await file_for(request, request.match_info["file_id"])
    response = web.StreamResponse(headers={"Content-Type": "application/jsonl",
                                           "Content-Disposition": f'attachment; filename="{stored.filename}"'})
    response.content_length = stored.bytes
    await response.prepare(request)
    async for part in gateway.files.content(stored.id):
        await response.write(part)
    await response.write_eof()
    return response


async def delete_file(request: web.Request) -> web.Response:
    gateway = Gateway.of(request)
    stored = await file_for(request, request.match_info["file_id"])
    await gateway.files.delete(stored)
    return web.json_response({"id": stored.id, "object": "file", "deleted": True})


async def file_for(request: web.Request, file_id: str) -> StoredFile:
    """A file the caller may read; 404 otherwise (another key's files are not theirs to learn of)."""
    stored = await Gateway.of(request).files.get(file_id)
    if stored is None or not may_access(request.get(CALLER_KEY), stored.owner):
        raise NotFound(f"file {file_id} does not exist", param="file_id")
    return stored


def list_response(data: list[dict[str, Any]], more: bool) -> web.Response:
    """OpenAI's list object: a page of objects, and whether more follow."""
    return web.json_response({"object": "list", "data": data, "has_more": more,
                              "first_id": data[0]["id"] if data else None,
                              "last_id": data[-1]["id"] if data else None})


def page_query(request: web.Request) -> tuple[int, str | None]:
    """`limit` (1..100, default 20) and `after` (an id) of a list call."""
    raw = request.query.get("limit", "20")
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise BadRequest("`limit` must be an integer from 1 to 100", param="limit")
    return int(raw), request.query.get("after")


def _owner(request: web.Request) -> str:
    caller = request.get(CALLER_KEY)
    return caller.digest if caller else ""
