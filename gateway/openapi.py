"""GET /openapi.json: the gateway's HTTP API as OpenAPI 3.1.

The request bodies' schemas are those of their typed definitions (gateway/api_types.py, pydantic's JSON
Schema), and so are the generation, poll, tokenize, model list, file and batch responses
(gateway/api_responses.py: the TypedDicts their builders return). The paths, and the small admin and
health replies, are written here, next to the routes (app.py). All of it is checked
against the running gateway by the schemathesis fuzz test (tests/test_fuzz.py): every documented status,
every response shape.
The WebSocket protocol is described in gateway/ws.py and fuzzed with hypothesis.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import TypeAdapter
from pydantic.json_schema import models_json_schema

from common.fleet_state import QueueState
from gateway.api_responses import (
    Accepted,
    BatchList,
    BatchObject,
    Cancelled,
    ChatCompletion,
    Completion,
    FileList,
    FileObject,
    ModelList,
    RequestState,
    Tokens,
)
from gateway.api_types import (
    ApiKeyBody,
    BatchBody,
    ChatBody,
    CompletionBody,
    DetokenizeBody,
    GenerateBody,
    LoadBody,
    TokenizeBody,
    UnloadBody,
)

_ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    reasons = {400: "Malformed request", 401: "Missing or invalid API key", 403: "Not allowed",
               404: "Unknown model, request, file or batch", 409: "The batch is finished already",
               413: "Body, prompt or file too large", 422: "Invalid field",
               429: "Over capacity or over the key's limits (see Retry-After)",
               503: "Queue (Redis) unreachable, or the model is not loaded on any worker"}
    return {str(s): _json(_ERROR, reasons[s]) for s in statuses}


_COMMON = (400, 401, 403, 413, 429, 503)
_PAGE = {"description": "An HTML page", "content": {"text/html": {"schema": {"type": "string"}}}}
_INT = {"type": "integer", "minimum": 0}
_REF = "#/components/schemas/{model}"
_TYPED: dict[str, Any] = {}  # the $defs of the typed responses' schemas, for components


def _typed(kind: Any) -> dict[str, Any]:
    """A typed response's JSON schema (gateway/api_responses.py); what it refers to goes to components."""
    schema = TypeAdapter(kind).json_schema(ref_template=_REF)
    _TYPED.update(schema.pop("$defs", {}))
    return schema


def _completion(kind: Any) -> dict[str, Any]:
    """OpenAI's (chat) completion object; a stream is Server-Sent Events, each `data:` line a JSON
    chunk, the last one `[DONE]`."""
    return {"description": "The completion", "content": {
        "application/json": {"schema": _typed(kind)},
        "text/event-stream": {"schema": {"type": "object", "required": ["data"],
                                         "properties": {"data": {"type": "string"}}}}}}


_TEXT_COMPLETION = _completion(Completion)
_CHAT_COMPLETION = _completion(ChatCompletion)
_MODEL_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_CONTROL = {"$ref": "#/components/schemas/ControlReply"}
_REQUEST_ID = {"name": "request_id", "in": "path", "required": True, "schema": {"type": "string"}}
_FILE_ID = {"name": "file_id", "in": "path", "required": True, "schema": {"type": "string"}}
_BATCH_ID = {"name": "batch_id", "in": "path", "required": True, "schema": {"type": "string"}}
_PAGING = [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
           {"name": "after", "in": "query", "schema": {"type": "string"},
            "description": "the last id of the page before"}]
_FILE, _BATCH = _typed(FileObject), _typed(BatchObject)

_BATCH_PATHS = {
    "/v1/files": {
        "post": {"summary": "Upload a batch input file (JSONL, checked line by line; OpenAI's Files API)",
                 "operationId": "createFile",
                 "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                     "type": "object", "required": ["purpose", "file"],
                     "properties": {"purpose": {"type": "string", "enum": ["batch"]},
                                    "file": {"type": "string", "format": "binary"}}}}}},
                 "responses": {"200": _json(_FILE, "The stored file"), **_errors(400, 401, 403, 413, 429, 503)}},
        "get": {"summary": "The caller's files, newest first", "operationId": "listFiles",
                "parameters": [*_PAGING, {"name": "purpose", "in": "query", "schema": {"type": "string"}}],
                "responses": {"200": _json(_typed(FileList), "Files"), **_errors(400, 401, 403, 429, 503)}}},
    "/v1/files/{file_id}": {
        "get": {"summary": "A file's fields", "operationId": "getFile", "parameters": [_FILE_ID],
                "responses": {"200": _json(_FILE, "The file"), **_errors(401, 403, 404, 429, 503)}},
        "delete": {"summary": "Delete a file", "operationId": "deleteFile", "parameters": [_FILE_ID],
                   "responses": {"200": _json({"type": "object", "required": ["id", "deleted"]}, "Deleted"),
                                 **_errors(401, 403, 404, 429, 503)}}},
    "/v1/files/{file_id}/content": {"get": {
        "summary": "A file's content (JSONL)", "operationId": "getFileContent", "parameters": [_FILE_ID],
        "responses": {"200": {"description": "The lines",
                              "content": {"application/jsonl": {"schema": {"type": "string"}}}},
                      **_errors(401, 403, 404, 429, 503)}}},
    "/v1/batches": {
        "post": {"summary": "Run an uploaded file's lines at the batch priority (OpenAI's Batch API)",
                 "operationId": "createBatch",
                 "requestBody": {"required": True, "content": {"application/json": {"schema": {
                     "$ref": "#/components/schemas/BatchBody"}}}},
                 "responses": {"200": _json(_BATCH, "The batch"), **_errors(400, 401, 403, 404, 413, 422, 429, 503)}},
        "get": {"summary": "The caller's batches, newest first", "operationId": "listBatches", "parameters": _PAGING,
                "responses": {"200": _json(_typed(BatchList), "Batches"), **_errors(400, 401, 403, 429, 503)}}},
    "/v1/batches/{batch_id}": {"get": {
        "summary": "A batch: status, request counts, output and error files", "operationId": "getBatch",
        "parameters": [_BATCH_ID],
        "responses": {"200": _json(_BATCH, "The batch"), **_errors(401, 403, 404, 429, 503)}}},
    "/v1/batches/{batch_id}/cancel": {"post": {
        "summary": "Cancel a batch: its lines in flight are cancelled, what completed is kept",
        "operationId": "cancelBatch", "parameters": [_BATCH_ID],
        "responses": {"200": _json(_BATCH, "The batch, cancelling"), **_errors(401, 403, 404, 409, 429, 503)}}},
}

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "llm-fleet gateway", "version": "0.1.0",
             "description": "Queue-based LLM serving: submit, stream (SSE, WebSocket /ws/generate), poll, cancel."},
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                       "description": "API key, when the gateway runs with LLM_FLEET_AUTH=true"}},
        "schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["message", "type", "code"],
                "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                               "param": {"type": ["string", "null"]}, "code": {"type": "integer"}}}}},
            "Accepted": _typed(Accepted),
            "RequestState": _typed(RequestState),
            "ModelList": _typed(ModelList),
            "ControlReply": {"type": "object", "required": ["model", "action", "workers"], "properties": {
                "model": {"type": "string"}, "action": {"type": "string"},
                "workers": {"type": "array", "items": {"type": "object", "required": ["worker_id", "job_id"]}}}},
            "Tokens": _typed(Tokens),
        },
    },
    "security": [{}, {"bearer": []}],
    "paths": {
        "/v1/generate": {"post": {
            "summary": "Submit a generation; poll it at Location", "operationId": "generate",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/GenerateBody"}}}},
            "responses": {"202": _json({"$ref": "#/components/schemas/Accepted"}, "Queued"),
                          **_errors(*_COMMON, 404, 422)}}},
        "/v1/requests/{request_id}": {
            "get": {"summary": "A request's status, text so far, usage and timings", "operationId": "getRequest",
                    "parameters": [_REQUEST_ID],
                    "responses": {"200": _json({"$ref": "#/components/schemas/RequestState"}, "The request"),
                                  **_errors(401, 403, 404, 429, 503)}},
            "delete": {"summary": "Cancel a queued or running request", "operationId": "cancelRequest",
                       "parameters": [_REQUEST_ID],
                       "responses": {"200": _json(_typed(Cancelled), "The status it ends in"),
                                     **_errors(401, 403, 404, 429, 503)}}},
        "/v1/completions": {"post": {
            "summary": "OpenAI completions (JSON, or SSE with stream=true)", "operationId": "completions",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/CompletionBody"}}}},
            "responses": {"200": _TEXT_COMPLETION,
                **_errors(*_COMMON, 404, 422), "502": _json(_ERROR, "The generation failed")}}},
        "/v1/chat/completions": {"post": {
            "summary": "OpenAI chat completions (JSON, or SSE with stream=true)", "operationId": "chatCompletions",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/ChatBody"}}}},
            "responses": {"200": _CHAT_COMPLETION,
                **_errors(*_COMMON, 404, 422), "502": _json(_ERROR, "The generation failed")}}},
        "/tokenize": {"post": {
            "summary": "A prompt or chat as the model's token ids (what a generate counts), as `vllm serve` has it",
            "operationId": "tokenize",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/TokenizeBody"}}}},
            "responses": {"200": _json({"$ref": "#/components/schemas/Tokens"}, "The tokens"),
                          **_errors(400, 401, 403, 404, 413, 422, 429, 503)}}},
        "/detokenize": {"post": {
            "summary": "Token ids back to text, as `vllm serve` has it", "operationId": "detokenize",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/DetokenizeBody"}}}},
            "responses": {"200": _json({"type": "object", "required": ["prompt"],
                                        "properties": {"prompt": {"type": "string"}}}, "The text"),
                          **_errors(400, 401, 403, 404, 413, 422, 429, 503)}}},
        "/v1/models": {"get": {"summary": "Models and their state on each worker", "operationId": "models",
                               "responses": {"200": _json({"$ref": "#/components/schemas/ModelList"}, "Model list"),
                                             **_errors(401, 403, 429, 503)}}},
        "/v1/fleet": {"get": {
            "summary": "The fleet at a glance (the console): workers, their models, KV and GPU, tokens/s; per model "
                       "the queue, its oldest wait, dead letters and 429s", "operationId": "fleet",
            "responses": {"200": _json({"type": "object", "required": ["at", "workers", "queues"], "properties": {
                "at": {"type": "number"},
                "workers": {"type": "array", "items": {"type": "object", "required": [
                    "worker_id", "state", "models", "gpu", "tokens_out", "tokens_per_s"]}},
                "queues": {"type": "object", "additionalProperties": {"type": "object", "required": [
                    "outstanding", "waiting", "held_by_workers", "oldest_waiting_s", "dead_letters", "rejected"]}}}},
                "The fleet"), **_errors(401, 403, 429, 503)}}},
        "/": {"get": {"summary": "The playground (a page: send a prompt, watch it stream)", "operationId": "playground",
                      "security": [], "responses": {"200": _PAGE}}},
        "/console": {"get": {"summary": "The fleet console (a page over /v1/fleet and /admin/models)",
                             "operationId": "console", "security": [], "responses": {"200": _PAGE}}},
        "/health": {"get": {"summary": "The process is alive", "operationId": "health", "security": [],
                            "responses": {"200": _json({"type": "object", "required": ["status"], "properties": {
                                "status": {"type": "string", "enum": ["ok"]}}}, "Alive")}}},
        "/ready": {"get": {"summary": "This gateway can take requests (Redis answers); which models are ready",
                           "operationId": "ready", "security": [],
                           "responses": {"200": _json({"type": "object", "required": ["ready", "workers", "models"],
                                                       "properties": {
                                                           "ready": {"type": "boolean", "enum": [True]},
                                                           "workers": _INT,
                                                           "models": {"type": "array", "items": {"type": "string"}},
                                                           "models_reason": {"type": "string"}}}, "Ready"),
                                         "503": _json({"type": "object", "required": ["ready", "reason"]},
                                                      "Not ready, and why")}}},
        "/metrics": {"get": {"summary": "Prometheus metrics (text exposition format)", "operationId": "metrics",
                             "security": [], "responses": {"200": {"description": "Metrics", "content": {
                                 "text/plain": {"schema": {"type": "string"}}}}, **_errors(503)}}},
        "/queue/{model}": {"get": {
            "summary": "One model's queue over all its streams (what KEDA's metrics-api trigger scales workers on: "
                       "`waiting`); an unknown model's queue is empty", "operationId": "queue", "security": [],
            "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": _json(_typed(QueueState), "The queue"), **_errors(503)}}},
        "/ws/generate": {"get": {"summary": "WebSocket: generate, cancel, attach (see gateway/ws.py)",
                                 "operationId": "websocket",
                                 "responses": {"101": {"description": "Switching protocols"},
                                               **_errors(400, 401, 403, 429, 503)}}},
        "/admin/keys": {
            "post": {"summary": "Create an API key (admin); the key is returned once", "operationId": "createKey",
                     "requestBody": {"required": True, "content": {"application/json": {
                         "schema": {"$ref": "#/components/schemas/ApiKeyBody"}}}},
                     "responses": {"201": _json({"type": "object", "required": ["key", "name"]}, "Created"),
                                   **_errors(400, 401, 403, 413, 422, 429, 503)}},
            "get": {"summary": "List API keys (names and limits, never the keys)", "operationId": "listKeys",
                    "responses": {"200": _json({"type": "object", "required": ["keys"]}, "Keys"),
                                  **_errors(401, 403, 429, 503)}}},
        "/admin/workers": {"get": {
            "summary": "Live workers: state, models (state, progress, KV), catalogue, GPU (admin)",
            "operationId": "listWorkers",
            "responses": {"200": _json({"type": "object", "required": ["workers"]}, "Workers"),
                          **_errors(401, 403, 429, 503)}}},
        "/admin/models/{name}/load": {"post": {
            "summary": "Load a catalogue model on named workers or up to N replicas (admin)",
            "operationId": "loadModel", "parameters": [_MODEL_NAME],
            "requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/LoadBody"}}}},
            "responses": {"200": _json(_CONTROL, "Done (wait) or nothing to do"),
                          "202": _json(_CONTROL, "Control jobs enqueued"),
                          **_errors(400, 401, 403, 404, 413, 422, 429, 503)}}},
        "/admin/models/{name}/unload": {"post": {
            "summary": "Unload a model from named workers or all that have it (admin)",
            "operationId": "unloadModel", "parameters": [_MODEL_NAME],
            "requestBody": {"content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/UnloadBody"}}}},
            "responses": {"200": _json(_CONTROL, "Done (wait) or nothing to do"),
                          "202": _json(_CONTROL, "Control jobs enqueued"),
                          **_errors(400, 401, 403, 404, 413, 422, 429, 503)}}},
        "/admin/keys/{name}": {"delete": {
            "summary": "Revoke an API key (admin)", "operationId": "revokeKey",
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": _json({"type": "object"}, "Revoked"), **_errors(401, 403, 404, 429, 503)}}},
        **_BATCH_PATHS,
    },
}


_, _BODY_SCHEMAS = models_json_schema(
    [(body, "validation") for body in (GenerateBody, CompletionBody, ChatBody, TokenizeBody, DetokenizeBody,
                                       LoadBody, UnloadBody, ApiKeyBody, BatchBody)],
    ref_template=_REF)
SPEC["components"]["schemas"].update({**_BODY_SCHEMAS["$defs"], **_TYPED})


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(SPEC)
