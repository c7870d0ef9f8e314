"""The gateway's aiohttp application: OpenAI-compatible REST API over the bus.

    app = create_app(GatewayConfig(model=DIR), bus)   # bus: connected Bus
    web.run_app(app, host=..., port=...)

The bus must be connected before the app starts; the app declares its queues
on startup, cancels its subscriptions on cleanup, and never closes the bus
(in the one-process mode other services share it).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson
import structlog
from aiohttp import web

from fastserve.common.bus import Bus
from fastserve.common.metrics import Metrics

from fastserve.gateway.config import GatewayConfig
from fastserve.gateway.jobs import JobTracker
from fastserve.gateway.model_info import ModelInfo
from fastserve.gateway.chat import render_chat
from fastserve.gateway.errors import APIError, bad
from fastserve.gateway.protocol import as_int, check_model

if TYPE_CHECKING:
    from fastserve.gateway.batch_runner import BatchRunner
    from fastserve.gateway.dashboard import Dashboard
    from fastserve.gateway.store import BatchStore
    from fastserve.gateway.submissions import SubmissionQueue

log = structlog.get_logger("fastserve.gateway")
# What the access-log line of a request says beyond method, path and status
# (handlers add the request id, token counts, finish reason).
ACCESS = web.RequestKey("access", dict)


@dataclass
class GatewayState:
    config: GatewayConfig
    bus: Bus
    model: ModelInfo
    metrics: Metrics
    tracker: JobTracker
    dashboard: Dashboard
    # Set when the app starts (gateway/durable.py).
    batches: BatchStore | None = None
    batch_runner: BatchRunner | None = None
    queue: SubmissionQueue | None = None


STATE = web.AppKey("state", GatewayState)


def dumps(obj: object) -> str:
    return orjson.dumps(obj).decode()


def json_response(data: object, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers, dumps=dumps)


def error_response(err: APIError, state: GatewayState | None = None) -> web.Response:
    if state is not None:
        state.metrics.observe_error(err.status)
    return json_response(err.body(), status=err.status)


async def read_json(request: web.Request) -> dict:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise bad(f"Invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise bad("The JSON body must be an object")
    return body


@web.middleware
async def access_log(request: web.Request, handler):
    """One INFO line per request, when it ends (the details are DEBUG lines)."""
    t0 = time.monotonic()
    request[ACCESS] = {}
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    finally:
        fields = request[ACCESS]
        if fields.pop("client_gone", False):
            status = 499
        log.info("request", method=request.method, path=request.path, status=status,
                 seconds=round(time.monotonic() - t0, 4), **fields)


def _is_dashboard(path: str) -> bool:
    return path == "/dashboard" or path.startswith("/dashboard/")


def _presented_key(request: web.Request) -> str | None:
    """The API key of a request: `Authorization: Bearer KEY`, or on the
    dashboard's paths also HTTP Basic auth with KEY as the password (what a
    browser sends after asking for it)."""
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        return auth[7:]
    if auth.startswith("Basic ") and _is_dashboard(request.path):
        try:
            return base64.b64decode(auth[6:], validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return None
    return None


@web.middleware
async def errors_and_auth(request: web.Request, handler):
    state = request.app[STATE]
    try:
        path = request.path
        if state.config.api_keys and (path.startswith("/v1/") or path in ("/tokenize", "/detokenize")
                                      or _is_dashboard(path)):
            key = _presented_key(request)
            if key is None or key not in state.config.api_keys:
                err = APIError(401, "Missing API key: send 'Authorization: Bearer <key>'." if key is None
                               else "Incorrect API key provided.", "invalid_request_error", None, "invalid_api_key")
                resp = error_response(err, state)
                if _is_dashboard(path):
                    resp.headers["WWW-Authenticate"] = 'Basic realm="fastserve dashboard", charset="UTF-8"'
                return resp
        return await handler(request)
    except APIError as err:
        return error_response(err, state)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status)
        return error_response(APIError(exc.status, exc.reason, "invalid_request_error", None, code), state)
    except Exception as exc:  # noqa: BLE001 - the client gets an OpenAI-shaped 500, the log the traceback
        log.exception("request.failed", path=request.path)
        return error_response(APIError(500, f"Internal error: {type(exc).__name__}: {exc}", "server_error",
                                       None, "internal_error"), state)


# ------------------------------------------------------------------ simple endpoints

def _model_card(state: GatewayState) -> dict:
    m = state.model
    # max_model_len: what a job can really use, the GPU KV pool included.
    return {"id": m.name, "object": "model", "created": m.created, "owned_by": "fastserve",
            "root": m.name, "parent": None, "max_model_len": state.tracker.max_model_len(m.max_model_len)}


async def models(request: web.Request) -> web.Response:
    return json_response({"object": "list", "data": [_model_card(request.app[STATE])]})


async def model_card(request: web.Request) -> web.Response:
    state = request.app[STATE]
    name = request.match_info["model_id"]
    if name != state.model.name:
        raise APIError(404, f"The model '{name}' does not exist; this server serves '{state.model.name}'.",
                       "invalid_request_error", "model", "model_not_found")
    return json_response(_model_card(state))


async def version(request: web.Request) -> web.Response:
    from importlib.metadata import version as dist_version

    return json_response({"version": dist_version("fastserve")})


async def ping(request: web.Request) -> web.Response:
    """vLLM's /ping (SageMaker): /health's answer."""
    return await health(request)


async def openapi(request: web.Request) -> web.Response:
    from fastserve.gateway.openapi import openapi_document

    model = request.app[STATE].model
    return json_response(openapi_document(model.name, model.vocab_size))


async def health(request: web.Request) -> web.Response:
    ok, body = request.app[STATE].tracker.health()
    return json_response(body, status=200 if ok else 503)


async def metrics_endpoint(request: web.Request) -> web.Response:
    body, content_type = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def tokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_json(request)
    if body.get("model") is not None:
        check_model(body, state.model)
    unknown = set(body) - {"model", "prompt", "messages", "add_special_tokens"}
    if unknown:
        raise bad(f"Unrecognized request argument supplied: {sorted(unknown)[0]}", sorted(unknown)[0])
    add_special = body.get("add_special_tokens", "messages" not in body)
    if not isinstance(add_special, bool):
        raise bad("'add_special_tokens' must be a boolean", "add_special_tokens")
    if "messages" in body:
        text = await asyncio.to_thread(render_chat, body, state.model)
    elif isinstance(body.get("prompt"), str):
        text = body["prompt"]
    else:
        raise bad("send 'prompt' (a string) or 'messages'", "prompt")
    if state.model.too_long(text):
        raise bad(f"the text is longer than any {state.model.max_model_len} tokens can hold", "prompt",
                  "context_length_exceeded")
    ids = await asyncio.to_thread(state.model.encode, text, add_special)
    return json_response({"tokens": ids, "count": len(ids),
                          "max_model_len": state.tracker.max_model_len(state.model.max_model_len)})


async def detokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_json(request)
    unknown = set(body) - {"model", "tokens"}
    if unknown:
        raise bad(f"Unrecognized request argument supplied: {sorted(unknown)[0]}", sorted(unknown)[0])
    if body.get("model") is not None:
        check_model(body, state.model)
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or any(as_int(t) is None for t in tokens):
        raise bad("'tokens' must be a list of token ids", "tokens")
    tokens = [as_int(t) for t in tokens]
    if any(not 0 <= t < state.model.vocab_size for t in tokens):
        raise bad(f"'tokens' holds ids outside the vocabulary [0, {state.model.vocab_size})", "tokens")
    return json_response({"prompt": state.model.decode(tokens)})


# ------------------------------------------------------------------ app factory

def create_app(config: GatewayConfig, bus: Bus, *, model: ModelInfo | None = None,
               metrics: Metrics | None = None) -> web.Application:
    from fastserve.gateway import batch_api, dashboard
    from fastserve.gateway.durable import durable_work
    from fastserve.gateway.serving import chat_completions, completions

    model = model or ModelInfo.load(config.model, config.served_model_name)
    metrics = metrics or Metrics(model.name)
    state = GatewayState(config, bus, model, metrics, JobTracker(config, bus, metrics),
                         dashboard.Dashboard(bus, config.instance_id, model.name, config.health_timeout))
    app = web.Application(middlewares=[access_log, errors_and_auth], client_max_size=32 * 1024 * 1024)
    app[STATE] = state
    # Every route here is described in gateway/openapi.py (a test checks both lists agree).
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model_id}", model_card)
    app.router.add_get("/health", health)
    app.router.add_get("/ping", ping)
    app.router.add_post("/ping", ping)
    app.router.add_get("/version", version)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    dashboard.add_routes(app)
    batch_api.add_routes(app)
    app.cleanup_ctx.append(_bus_lifecycle)
    app.cleanup_ctx.append(durable_work)
    app.on_shutdown.append(lambda app: app[STATE].dashboard.close_streams())
    return app


async def _bus_lifecycle(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    await state.tracker.start()
    await state.dashboard.start()
    tasks = [asyncio.create_task(state.tracker.run_cancel_sender(), name="gateway-cancel-sender"),
             asyncio.create_task(state.tracker.run_heartbeat(), name="gateway-heartbeat"),
             asyncio.create_task(state.tracker.run_watchdog(), name="gateway-watchdog"),
             asyncio.create_task(state.tracker.run_resubmitter(), name="gateway-resubmitter"),
             asyncio.create_task(state.dashboard.run_publisher(), name="gateway-dashboard")]
    log.info("gateway.started", gateway=state.config.instance_id, model=state.model.name,
             max_model_len=state.model.max_model_len, ts=time.time())
    yield
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await state.dashboard.stop()
    await state.tracker.stop()
    log.info("gateway.stopped", gateway=state.config.instance_id)
