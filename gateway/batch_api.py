"""OpenAI's Files and Batches endpoints (the `openai` client's
`files.create/retrieve/content` and `batches.create/retrieve/list/cancel`).
The work itself: gateway/batch_runner.py."""
from __future__ import annotations

import asyncio
import time
import uuid

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from fastserve.common.batch_format import dumps_line, error_line, parse_line
from fastserve.common.schemas import SUBMIT_URLS
from fastserve.gateway.app import STATE, json_response, read_json
from fastserve.gateway.errors import APIError, bad

COMPLETION_WINDOWS = {"24h": 24 * 3600}
MAX_FILE_BYTES = 200 * 1024 * 1024
_BATCH_KEYS = {"input_file_id", "endpoint", "completion_window", "metadata"}


def _not_found(what: str, ident: str) -> APIError:
    return APIError(404, f"No {what} found with id '{ident}'.", "invalid_request_error", None, "not_found")


def file_object(f: dict) -> dict:
    return {"id": f["id"], "object": "file", "bytes": f["bytes"], "created_at": f["created_at"],
            "filename": f["filename"], "purpose": f["purpose"], "status": "processed", "status_details": None,
            "expires_at": None}


def batch_object(b: dict) -> dict:
    return {"id": b["id"], "object": "batch", "endpoint": b["endpoint"], "errors": b["errors"],
            "input_file_id": b["input_file_id"], "completion_window": b["completion_window"],
            "status": b["status"], "output_file_id": b["output_file_id"], "error_file_id": b["error_file_id"],
            "created_at": b["created_at"], "in_progress_at": b["in_progress_at"], "expires_at": b["expires_at"],
            "finalizing_at": b["finalizing_at"], "completed_at": b["completed_at"], "failed_at": b["failed_at"],
            "expired_at": b["expired_at"], "cancelling_at": b["cancelling_at"], "cancelled_at": b["cancelled_at"],
            "request_counts": {"total": b["total"], "completed": b["completed"], "failed": b["failed"]},
            "metadata": b["metadata"]}


async def create_file(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if not request.content_type.startswith("multipart/"):
        raise bad("send the file as multipart/form-data with fields 'file' and 'purpose'", "file")
    try:
        form = await request.post()
    except (ValueError, HttpProcessingError) as exc:
        raise bad(f"the multipart body cannot be read: {exc}", "file") from None
    purpose, upload = form.get("purpose"), form.get("file")
    if purpose != "batch":
        raise bad(f"'purpose' must be 'batch' (the only purpose this server serves), got {purpose!r:.40}", "purpose")
    if not isinstance(upload, web.FileField):
        raise bad("'file' must be an uploaded file", "file")
    content = await asyncio.to_thread(upload.file.read)  # up to MAX_FILE_BYTES: not on the event loop
    if len(content) > MAX_FILE_BYTES:
        raise bad(f"the file is larger than {MAX_FILE_BYTES} bytes", "file")
    row = {"id": f"file-{uuid.uuid4().hex}", "filename": upload.filename or "upload.jsonl", "purpose": "batch",
           "bytes": len(content), "created_at": int(time.time()), "content": content}
    await state.batches.add_file(row)
    return json_response(file_object(row))


async def get_file(request: web.Request) -> web.Response:
    file_id = request.match_info["file_id"]
    f = await request.app[STATE].batches.file(file_id)
    if f is None:
        raise _not_found("file", file_id)
    return json_response(file_object(f))


async def file_content(request: web.Request) -> web.Response:
    file_id = request.match_info["file_id"]
    content = await request.app[STATE].batches.file_content(file_id)
    if content is None:
        raise _not_found("file", file_id)
    return web.Response(body=content, content_type="application/jsonl")


async def create_batch(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_json(request)
    for key in body:
        if key not in _BATCH_KEYS:
            raise bad(f"Unrecognized request argument supplied: {key}", key)
    endpoint, window = body.get("endpoint"), body.get("completion_window")
    if endpoint not in SUBMIT_URLS:
        raise bad(f"'endpoint' must be one of {', '.join(SUBMIT_URLS)}, got {endpoint!r:.60}", "endpoint")
    if window not in COMPLETION_WINDOWS:
        raise bad(f"'completion_window' must be one of {', '.join(COMPLETION_WINDOWS)}, got {window!r:.20}",
                  "completion_window")
    metadata = body.get("metadata")
    if metadata is not None and (not isinstance(metadata, dict) or len(metadata) > 16 or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512 for k, v in metadata.items())):
        raise bad("'metadata' must be at most 16 string keys (64 characters) with string values (512)", "metadata")
    file_id = body.get("input_file_id")
    f = await state.batches.file(file_id) if isinstance(file_id, str) else None
    if f is None:
        raise APIError(404, f"No file found with id {file_id!r:.80} ('input_file_id').", "invalid_request_error",
                       "input_file_id", "not_found")
    if f["purpose"] != "batch":
        raise bad(f"file {file_id} has purpose {f['purpose']!r}, not 'batch'", "input_file_id")
    content = await state.batches.file_content(file_id)
    batch_id = f"batch_{time.time_ns():016x}{uuid.uuid4().hex[:16]}"  # ids sort by creation (GET /v1/batches)
    # Every line is parsed and checked now (a file may hold many thousands): in a thread.
    rows, refused = await asyncio.to_thread(_line_rows, batch_id, content, endpoint)
    if not rows:
        raise bad(f"file {file_id} holds no request lines", "input_file_id")
    now = int(time.time())
    batch = {"id": batch_id, "endpoint": endpoint, "input_file_id": file_id, "completion_window": window,
             "status": "validating", "metadata": metadata, "errors": None, "total": len(rows), "completed": 0,
             "failed": refused, "created_at": now,
             "expires_at": now + COMPLETION_WINDOWS[window]}
    await state.batches.create(batch, rows)
    await state.batch_runner.send(batch_id)
    return json_response(batch_object(await state.batches.get(batch_id)))


def _line_rows(batch_id: str, content: bytes, endpoint: str) -> tuple[list[dict], int]:
    """The batch's line rows, and how many lines failed validation (each fails alone: the rest run)."""
    seen: set[str] = set()
    rows, refused = [], 0
    for i, text in enumerate(content.splitlines()):
        line = parse_line(i, text, endpoint, seen)
        row = {"batch_id": batch_id, "idx": i, "custom_id": line.custom_id or "", "done": False, "ok": None,
               "output": None}
        if line.error is not None:
            row.update(done=True, ok=False, output=dumps_line(error_line(line.custom_id, "invalid_request",
                                                                          line.error)))
            refused += 1
        rows.append(row)
    return rows, refused


async def get_batch(request: web.Request) -> web.Response:
    batch_id = request.match_info["batch_id"]
    b = await request.app[STATE].batches.get(batch_id)
    if b is None:
        raise _not_found("batch", batch_id)
    return json_response(batch_object(b))


async def list_batches(request: web.Request) -> web.Response:
    after = request.query.get("after")
    try:
        limit = int(request.query.get("limit", "20"))
    except ValueError:
        raise bad("'limit' must be an integer", "limit") from None
    if not 1 <= limit <= 100:
        raise bad(f"'limit' must be in 1..100, got {limit}", "limit")
    rows = await request.app[STATE].batches.list(after, limit + 1)
    data = [batch_object(b) for b in rows[:limit]]
    return json_response({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                          "last_id": data[-1]["id"] if data else None, "has_more": len(rows) > limit})


async def cancel_batch(request: web.Request) -> web.Response:
    state = request.app[STATE]
    batch_id = request.match_info["batch_id"]
    b = await state.batches.get(batch_id)
    if b is None:
        raise _not_found("batch", batch_id)
    if not await state.batch_runner.cancel(batch_id):
        b = await state.batches.get(batch_id)
        if b["status"] not in ("cancelling", "cancelled"):
            raise APIError(409, f"Cannot cancel a batch with status '{b['status']}'.", "invalid_request_error",
                           None, "batch_not_cancellable")
    return json_response(batch_object(await state.batches.get(batch_id)))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/files", create_file)
    app.router.add_get("/v1/files/{file_id}", get_file)
    app.router.add_get("/v1/files/{file_id}/content", file_content)
    app.router.add_post("/v1/batches", create_batch)
    app.router.add_get("/v1/batches", list_batches)
    app.router.add_get("/v1/batches/{batch_id}", get_batch)
    app.router.add_post("/v1/batches/{batch_id}/cancel", cancel_batch)
