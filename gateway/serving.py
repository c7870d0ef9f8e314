"""POST /v1/completions and /v1/chat/completions: submit one job per choice,
turn their token events into OpenAI responses (SSE when streaming), cancel
what is still running when the client goes away or a stop string matched."""
from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import aclosing
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from fastserve.common.logging import bind_job

from fastserve.gateway.app import STATE, GatewayState, dumps, error_response, json_response, read_json
from fastserve.gateway.jobs import Submission
from fastserve.gateway.output import ChoiceOutput, Delta, TokenLogprob
from fastserve.gateway.protocol import APIError, GenerateRequest, parse_chat, parse_completion

log = structlog.get_logger("fastserve.gateway")


class ClientGone(Exception):
    pass


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completion")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


class _Timing:
    def __init__(self, arrival: float) -> None:
        self.arrival = arrival
        self.last: float | None = None


async def _generate(request: web.Request, kind: str) -> web.StreamResponse:
    state = request.app[STATE]
    body = await read_json(request)
    parse = parse_completion if kind == "completion" else parse_chat
    # Tokenization and template rendering run in a thread: a huge prompt must
    # not freeze every other stream of this gateway (they are size-checked first).
    req = await asyncio.to_thread(parse, body, state.config, state.model)
    state.tracker.admit(len(req.prompts) * req.n)
    request_id = f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex}"
    trace_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
    choices, jobs = [], []
    for p, prompt in enumerate(req.prompts):
        for j in range(req.n):
            index = p * req.n + j
            choices.append(ChoiceOutput(index, state.model, prompt, req.stop, include_stop=req.include_stop_str_in_output,
                                        logprobs=req.logprobs, skip_special_tokens=req.skip_special_tokens))
            jobs.append((f"{request_id}-{index}", prompt, req.choice_sampling(j)))
    with bind_job(request_id, trace_id):
        arrival = time.monotonic()
        log.debug("request.received", kind=kind, prompts=len(req.prompts), n=req.n, stream=req.stream,
                  prompt_tokens=[len(p) for p in req.prompts], max_tokens=req.sampling.max_tokens)
        sub = await state.tracker.submit(trace_id, jobs)
        try:
            if req.stream:
                return await _stream(request, state, req, sub, choices, request_id, trace_id, arrival)
            return await _full(request, state, req, sub, choices, request_id, trace_id, arrival)
        except ClientGone:
            log.info("request.client_gone", stream=req.stream)
            return web.Response(status=499)
        except asyncio.CancelledError:
            # The client went away and aiohttp cancelled the handler: the jobs are cancelled below.
            log.info("request.client_gone", stream=req.stream)
            raise
        finally:
            state.tracker.release(sub, reason="client disconnected")


async def _events(request: web.Request, state: GatewayState, sub: Submission, choices: list[ChoiceOutput],
                  arrival: float) -> AsyncIterator[tuple[ChoiceOutput, Delta]]:
    """(choice, delta) as token events arrive, until every choice is finished
    or the request's deadline passes (then the unfinished choices end in an error)."""
    timings = [_Timing(arrival) for _ in choices]
    while not all(c.finished for c in choices):
        try:
            index, ev = await asyncio.wait_for(sub.events.get(), max(sub.deadline - time.time(), 0.0))
        except asyncio.TimeoutError:
            for c in choices:
                if not c.finished:
                    c.error = (f"the request did not finish within its deadline "
                               f"({state.config.request_timeout:g}s, --request-timeout)")
                    yield c, Delta()
            return
        c = choices[index]
        if c.finished:
            continue  # e.g. tokens that were in flight when a stop string matched
        _observe(state, timings[index], ev)
        delta = c.add(ev)
        if c.finished:
            job_id = sub.job_ids[index]
            if c.stopped_by_string:
                state.tracker.release_job(sub, job_id, reason="stop string")
            else:
                state.tracker.mark_finished(sub, job_id)
            if c.error is None:
                state.metrics.observe_finished(time.monotonic() - arrival, c.finish_reason or "stop",
                                               c.prompt_len, c.num_tokens)
        yield c, delta


def _observe(state: GatewayState, t: _Timing, ev) -> None:
    now = time.monotonic()
    if ev.queue_time is not None:
        state.metrics.observe_queue_time(ev.queue_time)
    if not ev.token_ids:
        return
    if t.last is None:
        state.metrics.observe_first_token(now - t.arrival)
        rest = len(ev.token_ids) - 1
    else:
        rest = len(ev.token_ids)
        for _ in range(rest):
            state.metrics.observe_inter_token((now - t.last) / rest)
    t.last = now


def _usage(req: GenerateRequest, choices: list[ChoiceOutput]) -> dict:
    prompt = sum(len(p) for p in req.prompts)
    completion = sum(c.num_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion_logprobs(lps: list[TokenLogprob], offset: int) -> dict:
    offsets = []
    for lp in lps:
        offsets.append(offset)
        offset += len(lp.text)
    return {"tokens": [lp.text for lp in lps], "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{t: v for _, t, v in lp.top} if lp.top else None for lp in lps] if any(
                lp.top for lp in lps) else None,
            "text_offset": offsets}


def _chat_logprobs(lps: list[TokenLogprob]) -> dict:
    def entry(text: str, lp: float) -> dict:
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    return {"content": [{**entry(lp.text, lp.logprob), "top_logprobs": [entry(t, v) for _, t, v in lp.top]}
                        for lp in lps]}


def _error_from_event(c: ChoiceOutput) -> APIError:
    if "deadline" in (c.error or ""):
        return APIError(504, f"Request timed out: {c.error}", "timeout", None, "timeout")
    return APIError(500, f"The backend failed this request: {c.error}", "server_error", None, "internal_error")


async def _full(request, state, req, sub, choices, request_id, trace_id, arrival) -> web.Response:
    async with aclosing(_events(request, state, sub, choices, arrival)) as events:
        async for c, _ in events:
            if c.error is not None:
                return error_response(_error_from_event(c), state)
    created = int(time.time())
    if req.kind == "completion":
        out = [{"index": c.index, "text": c.output_text, "finish_reason": c.finish_reason,
                "logprobs": _completion_logprobs(c.all_logprobs, 0) if req.logprobs else None} for c in choices]
        obj = "text_completion"
    else:
        out = [{"index": c.index, "message": {"role": "assistant", "content": c.output_text},
                "finish_reason": c.finish_reason,
                "logprobs": _chat_logprobs(c.all_logprobs) if req.logprobs else None} for c in choices]
        obj = "chat.completion"
    usage = _usage(req, choices)
    log.info("request.finished", usage=usage, seconds=round(time.monotonic() - arrival, 4),
             finish_reasons=[c.finish_reason for c in choices])
    return json_response({"id": request_id, "object": obj, "created": created, "model": state.model.name,
                          "choices": out, "usage": usage}, headers={"X-Request-Id": trace_id})


async def _stream(request, state, req, sub, choices, request_id, trace_id, arrival) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Request-Id": trace_id})
    await resp.prepare(request)
    created = int(time.time())
    chat = req.kind == "chat"
    base = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": state.model.name}
    offsets = [0] * len(choices)

    async def send(data: dict | str) -> None:
        payload = data if isinstance(data, str) else dumps(data)
        try:
            await resp.write(f"data: {payload}\n\n".encode())
        except ConnectionResetError as exc:
            raise ClientGone() from exc

    def chunk(c: ChoiceOutput, d: Delta, first: bool = False) -> dict:
        if chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": d.text} if d.text else {})
            lp = _chat_logprobs(d.logprobs) if req.logprobs and d.logprobs else None
            choice = {"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": d.finish_reason}
        else:
            lp = _completion_logprobs(d.logprobs, offsets[c.index]) if req.logprobs and d.logprobs else None
            choice = {"index": c.index, "text": d.text, "logprobs": lp, "finish_reason": d.finish_reason}
        offsets[c.index] += sum(len(x.text) for x in d.logprobs)
        out = {**base, "choices": [choice]}
        if req.include_usage:
            out["usage"] = None
        return out

    try:
        if chat:
            for c in choices:
                await send(chunk(c, Delta(), first=True))
        failed = False
        async with aclosing(_events(request, state, sub, choices, arrival)) as events:
            async for c, d in events:
                if c.error is not None:
                    await send(_error_from_event(c).body())
                    failed = True
                    break
                if d.text or d.finish_reason or d.logprobs:
                    await send(chunk(c, d))
        if req.include_usage and not failed:
            await send({**base, "choices": [], "usage": _usage(req, choices)})
        await send("[DONE]")
    except ClientGone:
        log.info("request.client_gone", stream=True)
        return resp
    log.info("request.finished", usage=_usage(req, choices), seconds=round(time.monotonic() - arrival, 4),
             finish_reasons=[c.finish_reason for c in choices], stream=True)
    try:
        await resp.write_eof()
    except ConnectionResetError:
        pass
    return resp
