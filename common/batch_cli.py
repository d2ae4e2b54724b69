"""`llm-fleet batch submit FILE.jsonl | status ID | results ID`: the Batch API from a terminal, through a
gateway's HTTP API (the same calls the openai SDK makes), with a progress bar while a batch runs."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp
from tqdm import tqdm

_FINAL = ("completed", "failed", "expired", "cancelled")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("LLM_FLEET_URL", "http://127.0.0.1:8000"),
                        help="the gateway (env LLM_FLEET_URL)")
    parser.add_argument("--api-key", default=os.environ.get("LLM_FLEET_API_KEY"), help="env LLM_FLEET_API_KEY")
    actions = parser.add_subparsers(dest="action", required=True)
    submit = actions.add_parser("submit", help="upload a JSONL file and start a batch over it")
    submit.add_argument("file", type=Path)
    submit.add_argument("--window", default="24h", help="completion window (default 24h)")
    submit.add_argument("--wait", action="store_true", help="follow it with a progress bar until it ends")
    status = actions.add_parser("status", help="a batch's status and counts")
    status.add_argument("batch_id")
    status.add_argument("--wait", action="store_true", help="follow it with a progress bar until it ends")
    results = actions.add_parser("results", help="write a batch's output (and error) lines")
    results.add_argument("batch_id")
    results.add_argument("--output", type=Path, help="file for the output lines (default: stdout)")
    results.add_argument("--errors", type=Path, help="file for the error lines (default: stderr)")


def run(args: argparse.Namespace) -> None:
    try:
        asyncio.run(_run(args))
    except _ApiError as exc:
        raise SystemExit(f"llm-fleet batch {args.action}: {exc}") from None


class _ApiError(Exception):
    pass


async def _run(args: argparse.Namespace) -> None:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with aiohttp.ClientSession(args.url, headers=headers) as http:
        if args.action == "submit":
            batch = await _submit(http, args.file, args.window)
            print(batch["id"], flush=True)
            if args.wait:
                await _follow(http, batch["id"])
        elif args.action == "status":
            if args.wait:
                await _follow(http, args.batch_id)
            print(json.dumps(await _call(http, "GET", f"/v1/batches/{args.batch_id}"), indent=1))
        else:
            await _results(http, args.batch_id, args.output, args.errors)


async def _submit(http: aiohttp.ClientSession, path: Path, window: str) -> dict[str, Any]:
    with path.open("rb") as source:
        first = json.loads(source.readline() or b"{}")
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        source.seek(0)
        form.add_field("file", source, filename=path.name, content_type="application/jsonl")
        uploaded = await _call(http, "POST", "/v1/files", data=form)
    return await _call(http, "POST", "/v1/batches", json={
        "input_file_id": uploaded["id"], "endpoint": first.get("url"), "completion_window": window})


async def _follow(http: aiohttp.ClientSession, batch_id: str) -> None:
    batch = await _call(http, "GET", f"/v1/batches/{batch_id}")
    with tqdm(total=batch["request_counts"]["total"], unit="line", file=sys.stderr) as bar:
        while True:
            counts = batch["request_counts"]
            bar.update(counts["completed"] + counts["failed"] - bar.n)
            bar.set_postfix(status=batch["status"], failed=counts["failed"])
            if batch["status"] in _FINAL:
                return
            await asyncio.sleep(0.5)
            batch = await _call(http, "GET", f"/v1/batches/{batch_id}")


async def _results(http: aiohttp.ClientSession, batch_id: str, output: Path | None, errors: Path | None) -> None:
    batch = await _call(http, "GET", f"/v1/batches/{batch_id}")
    if batch["status"] not in _FINAL:
        raise _ApiError(f"batch {batch_id} is {batch['status']}; its results come once it ends")
    for file_id, target, default in ((batch["output_file_id"], output, sys.stdout.buffer),
                                     (batch["error_file_id"], errors, sys.stderr.buffer)):
        if file_id is None:
            continue
        async with http.get(f"/v1/files/{file_id}/content") as response:
            if response.status != 200:
                raise _ApiError(await response.text())
            sink = target.open("wb") if target else default
            try:
                async for chunk in response.content.iter_chunked(1 << 16):
                    sink.write(chunk)
            finally:
                if target:
                    sink.close()
                else:
                    sink.flush()


async def _call(http: aiohttp.ClientSession, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    async with http.request(method, path, **kwargs) as response:
        body = await response.json(content_type=None)
        if response.status != 200:
            raise _ApiError(body.get("error", {}).get("message", body) if isinstance(body, dict) else body)
        return body
