"""POST /v1/completions and /v1/chat/completions: submit one job per choice
(best_of per prompt), turn their token events into OpenAI responses (SSE
when streaming), cancel what is still running when the client goes away or
a stop string matched."""
from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import aclosing
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from fastserve.common.logging import bind_job
from fastserve.common.schemas import PRIORITY_INTERACTIVE

from fastserve.gateway.app import ACCESS, STATE, GatewayState, dumps, error_response, json_response, read_json
from fastserve.gateway.jobs import Submission
from fastserve.gateway.output import ChoiceOutput, Delta, TokenLogprob
from fastserve.gateway.protocol import APIError, GenerateRequest, parse_chat, parse_completion
from fastserve.gateway.tools import ContentGate, calls_from_required, extract_tool_calls, tool_call

log = structlog.get_logger("fastserve.gateway")


class ClientGone(Exception):
    pass


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completion")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


class Timing:
    """When a request's first token and each choice's last token arrived."""

    def __init__(self, arrival: float, num_choices: int, interactive: bool = True) -> None:
        self.arrival = arrival
        # Batch-class requests (submission queue) stay out of the latency histograms
        # and the dashboard's samples: those describe interactive traffic.
        self.interactive = interactive
        self.first: float | None = None
        self.last: list[float | None] = [None] * num_choices
        self.queue_seen = False
        self.norm_latency: list[float] = []  # of each finished choice: seconds per output token


async def _generate(request: web.Request, kind: str) -> web.StreamResponse:
    state = request.app[STATE]
    body = await read_json(request)
    parse = parse_completion if kind == "completion" else parse_chat
    # Tokenization and template rendering run in a thread: a huge prompt must
    # not freeze every other stream of this gateway (they are size-checked first).
    req = await asyncio.to_thread(parse, body, state.config, state.model,
                                  state.tracker.max_model_len(state.model.max_model_len))
    state.tracker.admit(len(req.prompts) * req.best_of)
    request_id = response_id(req)
    trace_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
    choices, jobs = plan_choices(state, req, request_id)
    request[ACCESS].update(request_id=request_id, prompt_tokens=sum(len(p) for p in req.prompts))
    with bind_job(request_id, trace_id):
        arrival = time.monotonic()
        log.debug("request.received", kind=kind, prompts=len(req.prompts), n=req.n, best_of=req.best_of,
                  stream=req.stream, prompt_tokens=[len(p) for p in req.prompts],
                  max_tokens=req.sampling.max_tokens, user=req.user)
        sub = await state.tracker.submit(trace_id, jobs, priority=req.priority)
        try:
            if req.stream:
                return await _stream(request, state, req, sub, choices, request_id, trace_id, arrival)
            return await _full(request, state, req, sub, choices, request_id, trace_id, arrival)
        except ClientGone:
            log.debug("request.client_gone")
            request[ACCESS]["client_gone"] = True
            return web.Response(status=499)
        except asyncio.CancelledError:
            # The client went away and aiohttp cancelled the handler: the jobs are cancelled below.
            log.debug("request.client_gone")
            request[ACCESS]["client_gone"] = True
            raise
        except asyncio.CancelledError:
            # The client went away and aiohttp cancelled the handler: the jobs are cancelled below.
            log.info("request.client_gone", stream=req.stream)
            raise
        finally:
            state.tracker.release(sub, reason="client disconnected")


def response_id(req: GenerateRequest) -> str:
    return f"{'cmpl' if req.kind == 'completion' else 'chatcmpl'}-{req.request_id or uuid.uuid4().hex}"


def plan_choices(state: GatewayState, req: GenerateRequest, request_id: str) -> tuple[list[ChoiceOutput], list]:
    """One ChoiceOutput and one job (job id, prompt ids, sampling) per choice: best_of per prompt."""
    choices, jobs = [], []
    for p, prompt in enumerate(req.prompts):
        for j in range(req.best_of):
            index = p * req.best_of + j
            choices.append(ChoiceOutput(index, state.model, prompt, req.stop,
                                        include_stop=req.include_stop_str_in_output, logprobs=req.logprobs,
                                        skip_special_tokens=req.skip_special_tokens,
                                        prefix=req.echo_texts[p] if req.echo else "", discard=req.echo_only))
            jobs.append((f"{request_id}-{index}", prompt, req.choice_sampling(j)))
    return choices, jobs


async def choice_events(request: web.Request | None, state: GatewayState, sub: Submission,
                        choices: list[ChoiceOutput], timing: Timing) -> AsyncIterator[tuple[ChoiceOutput, Delta]]:
    """(choice, delta) as token events arrive, until every choice is finished
    or the request's deadline passes (then the unfinished choices end in an
    error). A client that goes away cancels the handler (aiohttp's handler
    cancellation), and with it this wait."""
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
        _observe(state, timing, index, ev)
        delta = c.add(ev)
        if c.finished:
            if timing.last[index] is not None and c.num_tokens:
                timing.norm_latency.append((timing.last[index] - timing.arrival) / c.num_tokens)
            job_id = sub.job_ids[index]
            if c.stopped_by_string:
                state.tracker.release_job(sub, job_id, reason="stop string")
            else:
                state.tracker.mark_finished(sub, job_id)
        yield c, delta


def _observe(state: GatewayState, t: Timing, index: int, ev) -> None:
    now = time.monotonic()
    metrics = state.metrics if t.interactive else None
    if ev.queue_time is not None and not t.queue_seen:
        t.queue_seen = True
        if metrics:
            metrics.observe_queue_time(ev.queue_time)
    if not ev.token_ids:
        return
    if t.first is None:
        t.first = now
        if metrics:
            metrics.observe_first_token(now - t.arrival)
    last = t.last[index]
    if last is not None and metrics:
        for _ in ev.token_ids:
            metrics.observe_inter_token((now - last) / len(ev.token_ids))
    t.last[index] = now


def observe_finished(state: GatewayState, req: GenerateRequest, returned: list[ChoiceOutput], timing: Timing,
                     queued: float = 0.0) -> tuple[dict, str]:
    """Metrics and the dashboard's latency samples of a request that completed
    (`queued`: seconds it waited before the gateway took it, for the submission
    queue's batch class); its usage and finish reason."""
    usage = _usage(req, returned)
    reasons = [c.finish_reason or "stop" for c in returned]
    reason = "length" if "length" in reasons else reasons[0]
    seconds = time.monotonic() - timing.arrival
    if timing.interactive:
        state.metrics.observe_request(seconds, reason, usage["prompt_tokens"], usage["completion_tokens"])
        state.dashboard.observe_request(None if timing.first is None else timing.first - timing.arrival,
                                        timing.norm_latency)
    else:
        state.metrics.observe_batch_request(queued + seconds, reason, usage["prompt_tokens"],
                                            usage["completion_tokens"])
    log.debug("request.finished", usage=usage, seconds=round(seconds, 4), finish_reasons=reasons)
    return usage, reason


def _finish_request(request: web.Request, state: GatewayState, req: GenerateRequest,
                    returned: list[ChoiceOutput], timing: Timing) -> dict:
    """observe_finished, and the access-log fields of an HTTP request."""
    usage, reason = observe_finished(state, req, returned, timing)
    request[ACCESS].update(completion_tokens=usage["completion_tokens"], finish_reason=reason)
    return usage


def _usage(req: GenerateRequest, choices: list[ChoiceOutput]) -> dict:
    prompt = sum(len(p) for p in req.prompts)
    completion = sum(c.num_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _best(req: GenerateRequest, choices: list[ChoiceOutput]) -> list[ChoiceOutput]:
    """Of each prompt's best_of choices, the n with the highest cumulative
    logprob, renumbered 0.. in that order (vLLM's best_of)."""
    if req.best_of == req.n:
        return choices
    out = []
    for p in range(len(req.prompts)):
        group = choices[p * req.best_of:(p + 1) * req.best_of]
        for k, c in enumerate(sorted(group, key=lambda c: -c.cumulative_logprob)[:req.n]):
            c.index = p * req.n + k
            out.append(c)
    return out


def _prompt_logprobs_by_prompt(req: GenerateRequest, choices: list[ChoiceOutput]) -> list[list | None]:
    """The engine computes a prompt's logprobs in its first choice only."""
    return [choices[p * req.best_of].prompt_logprobs for p in range(len(req.prompts))]


def _vllm_prompt_logprobs(model, prompt: list[int], lps: list | None) -> list | None:
    """vLLM's prompt_logprobs: None for the first token, then per token
    {token_id: {"logprob", "rank", "decoded_token"}} with the top-k beside it."""
    if lps is None:
        return None
    out: list = [None]
    for tid, p in zip(prompt[1:], lps):
        entry = {str(tid): {"logprob": p.logprob, "rank": p.rank, "decoded_token": model.token_text(tid)}}
        for r, alt in enumerate(p.top, start=1):
            entry.setdefault(str(alt.token_id), {"logprob": alt.logprob, "rank": r,
                                                 "decoded_token": model.token_text(alt.token_id)})
        out.append(entry)
    return out


def _echo_logprobs(model, prompt: list[int], lps: list | None) -> list[TokenLogprob | None]:
    """Completion logprobs of the echoed prompt: the first token has none."""
    out: list[TokenLogprob | None] = [TokenLogprob(prompt[0], model.token_text(prompt[0]), None, [])]
    for tid, p in zip(prompt[1:], lps or []):
        out.append(TokenLogprob(tid, model.token_text(tid), p.logprob,
                                [(alt.token_id, model.token_text(alt.token_id), alt.logprob) for alt in p.top]))
    return out


def _completion_logprobs(lps: list[TokenLogprob], offset: int) -> dict:
    offsets = []
    for lp in lps:
        offsets.append(offset)
        offset += len(lp.text)
    return {"tokens": [lp.text for lp in lps], "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{t: v for _, t, v in lp.top} if lp.top else None for lp in lps] if any(
                lp.top for lp in lps) else None,
            "text_offset": offsets}


def _chat_logprobs(model, lps: list[TokenLogprob]) -> dict:
    def entry(tid: int, text: str, lp: float) -> dict:
        return {"token": text, "logprob": lp, "bytes": list(model.token_bytes(tid))}

    return {"content": [{**entry(lp.token_id, lp.text, lp.logprob),
                         "top_logprobs": [entry(t, s, v) for t, s, v in lp.top]} for lp in lps]}


def _message(req: GenerateRequest, c: ChoiceOutput) -> tuple[dict, str | None]:
    """The assistant message of a finished choice and its finish reason."""
    text, reason = c.output_text, c.finish_reason
    tools = req.tools
    if tools is None or tools.choice == "none":
        return {"role": "assistant", "content": text}, reason
    if tools.choice == "named":
        return {"role": "assistant", "content": None, "tool_calls": [tool_call(tools.name, text)]}, reason
    if tools.choice == "required":
        try:
            calls = calls_from_required(text)
        except (ValueError, KeyError, TypeError):  # cut short by max_tokens: not a complete call
            return {"role": "assistant", "content": text}, reason
        return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
    content, calls = extract_tool_calls(tools.parser, text)
    if not calls:
        return {"role": "assistant", "content": text}, reason
    if not tools.parallel:
        calls = calls[:1]
    return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"


def error_from_event(c: ChoiceOutput) -> APIError:
    if "deadline" in (c.error or ""):
        return APIError(504, f"Request timed out: {c.error}", "timeout", None, "timeout")
    return APIError(500, f"The backend failed this request: {c.error}", "server_error", None, "internal_error")


async def _full(request, state, req, sub, choices, request_id, trace_id, arrival) -> web.Response:
    timing = Timing(arrival, len(choices), interactive=req.priority == PRIORITY_INTERACTIVE)
    async with aclosing(choice_events(request, state, sub, choices, timing)) as events:
        async for c, _ in events:
            if c.error is not None:
                return error_response(error_from_event(c), state)
    resp, returned = response_body(state, req, choices, request_id)
    _finish_request(request, state, req, returned, timing)
    return json_response(resp, headers={"X-Request-Id": trace_id})


def response_body(state: GatewayState, req: GenerateRequest, choices: list[ChoiceOutput],
                  request_id: str) -> tuple[dict, list[ChoiceOutput]]:
    """The non-streamed response of finished choices, and the choices it returns (best_of keeps n)."""
    created = int(time.time())
    prompt_lps = _prompt_logprobs_by_prompt(req, choices)
    returned = _best(req, choices)
    model = state.model
    out = []
    for c in returned:
        p = c.index // req.n
        if req.kind == "completion":
            lps = None
            if req.logprobs:
                tokens = ([] if not req.echo else _echo_logprobs(model, req.prompts[p], prompt_lps[p]))
                lps = _completion_logprobs(tokens + c.all_logprobs, 0)
            choice = {"index": c.index, "text": c.output_text, "logprobs": lps, "finish_reason": c.finish_reason}
            if req.prompt_logprobs is not None:
                choice["prompt_logprobs"] = _vllm_prompt_logprobs(model, req.prompts[p], prompt_lps[p])
        else:
            message, reason = _message(req, c)
            choice = {"index": c.index, "message": message, "finish_reason": reason,
                      "logprobs": _chat_logprobs(model, c.all_logprobs) if req.logprobs else None}
        out.append(choice)
    resp = {"id": request_id, "object": "text_completion" if req.kind == "completion" else "chat.completion",
            "created": created, "model": model.name, "choices": out, "usage": _usage(req, returned)}
    if req.kind == "chat" and req.prompt_logprobs is not None:
        resp["prompt_logprobs"] = _vllm_prompt_logprobs(model, req.prompts[0], prompt_lps[0])
    return resp, returned


async def _stream(request, state, req, sub, choices, request_id, trace_id, arrival) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Request-Id": trace_id})
    await resp.prepare(request)
    created = int(time.time())
    chat = req.kind == "chat"
    model = state.model
    # A reply that may hold tool calls: with tool_choice "auto" its content streams until the
    # parser's marker may begin (ContentGate), the calls come whole at the end; a named or
    # required call (grammar-forced JSON) is sent whole at the end.
    buffered = chat and req.tools is not None and req.tools.choice != "none"
    gates = [ContentGate(req.tools.parser) if buffered and req.tools.choice == "auto" else None
             for _ in choices]
    base = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model.name}
    offsets = [0] * len(choices)
    echoed = [False] * len(choices)

    async def send(data: dict | str) -> None:
        payload = data if isinstance(data, str) else dumps(data)
        try:
            await resp.write(f"data: {payload}\n\n".encode())
        except ConnectionResetError as exc:
            raise ClientGone() from exc

    def chunk(c: ChoiceOutput, d: Delta, first: bool = False) -> dict | None:
        if chat and buffered and not first:
            gate = gates[c.index]
            if d.finish_reason is None:
                text = gate.advance(c.output_text) if gate is not None else ""
                if not text:
                    return None
                choice = {"index": c.index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
            else:
                message, reason = _message(req, c)
                delta = {k: v for k, v in message.items() if k != "role" and v is not None}
                if gate is not None:
                    # What content remains unsent: all of it when the reply held no call.
                    rest = gate.rest(c.output_text, bool(delta.get("tool_calls")))
                    delta.pop("content", None)
                    if rest:
                        delta["content"] = rest
                for i, call in enumerate(delta.get("tool_calls", [])):
                    call["index"] = i
                choice = {"index": c.index, "delta": delta, "logprobs": None, "finish_reason": reason}
        elif chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": d.text} if d.text else {})
            lp = _chat_logprobs(model, d.logprobs) if req.logprobs and d.logprobs else None
            choice = {"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": d.finish_reason}
        else:
            tokens = d.logprobs
            if req.echo and not echoed[c.index]:
                echoed[c.index] = True
                if req.logprobs:
                    p = c.index // req.n
                    tokens = _echo_logprobs(model, req.prompts[p], choices[p * req.best_of].prompt_logprobs) + tokens
            lp = _completion_logprobs(tokens, offsets[c.index]) if req.logprobs and tokens else None
            offsets[c.index] += sum(len(x.text) for x in tokens)
            choice = {"index": c.index, "text": d.text, "logprobs": lp, "finish_reason": d.finish_reason}
        out = {**base, "choices": [choice]}
        if req.include_usage:
            out["usage"] = None
        return out

    timing = Timing(arrival, len(choices), interactive=req.priority == PRIORITY_INTERACTIVE)
    try:
        if chat:
            for c in choices:
                await send(chunk(c, Delta(), first=True))
        failed = False
        async with aclosing(choice_events(request, state, sub, choices, timing)) as events:
            async for c, d in events:
                if c.error is not None:
                    await send(error_from_event(c).body())
                    failed = True
                    break
                if d.text or d.finish_reason or d.logprobs:
                    data = chunk(c, d)
                    if data is not None:
                        await send(data)
        if not failed:
            usage = _finish_request(request, state, req, choices, timing)
            if req.include_usage:
                await send({**base, "choices": [], "usage": usage})
        await send("[DONE]")
    except ClientGone:
        log.debug("request.client_gone", stream=True)
        request[ACCESS]["client_gone"] = True
        return resp
    try:
        await resp.write_eof()
    except ConnectionResetError:
        pass
    return resp
