"""OpenAI's batch file format, shared by the Batch API (gateway) and
`fastserve run-batch`: one request per input line, one result per output line.

    in:  {"custom_id": "r1", "method": "POST", "url": "/v1/completions", "body": {...}}
    out: {"id": "batch_req_...", "custom_id": "r1",
          "response": {"status_code": 200, "request_id": "cmpl-...", "body": {...}}, "error": null}

A line that cannot run (not JSON, no custom_id, another url, ...) gets an
output line of its own with `response` null and `error` {"code", "message"}.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass

import orjson

from fastserve.common.schemas import SUBMIT_URLS, SubmitResult


@dataclass
class BatchLine:
    index: int  # 0-based line number
    custom_id: str | None
    url: str = ""
    body: dict | None = None
    error: str | None = None  # why this line cannot run


def parse_line(index: int, text: str | bytes, endpoint: str | None = None, seen: set[str] | None = None) -> BatchLine:
    """One input line. `endpoint`: the url every line must have (the Batch
    API's); `seen`: custom_ids of the lines before (a repeated one is refused)."""
    try:
        raw = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return BatchLine(index, None, error=f"line {index + 1} is not JSON: {exc}")
    if not isinstance(raw, dict):
        return BatchLine(index, None, error=f"line {index + 1} is not a JSON object")
    cid = raw.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return BatchLine(index, None, error=f"line {index + 1} has no custom_id (a non-empty string)")
    if seen is not None:
        if cid in seen:
            return BatchLine(index, cid, error=f"line {index + 1} repeats custom_id {cid!r}")
        seen.add(cid)
    if raw.get("method", "POST") != "POST":
        return BatchLine(index, cid, error=f"method must be POST, got {raw.get('method')!r}")
    url = raw.get("url")
    if url not in SUBMIT_URLS:
        return BatchLine(index, cid, error=f"url must be one of {', '.join(SUBMIT_URLS)}, got {url!r}")
    if endpoint is not None and url != endpoint:
        return BatchLine(index, cid, error=f"url {url!r} differs from the batch's endpoint {endpoint!r}")
    body = raw.get("body")
    if not isinstance(body, dict):
        return BatchLine(index, cid, error="body must be a JSON object")
    return BatchLine(index, cid, url, body)


def error_line(custom_id: str | None, code: str, message: str) -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


def result_line(custom_id: str | None, result: SubmitResult) -> dict:
    """The output line of a request that ran (status 200 or the error the endpoint answered)."""
    body = result.response if result.status == 200 else {"error": result.error}
    request_id = (result.response or {}).get("id", result.request_id)
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": result.status, "request_id": request_id, "body": body}, "error": None}


def dumps_line(line: dict) -> str:
    return orjson.dumps(line).decode()
