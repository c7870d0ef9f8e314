"""The OpenAPI 3.1 document served at /openapi.json: every route of the
gateway (gateway/app.py), the request parameters it honours (anything else
is a 400, see gateway/protocol.py) and the shapes of its answers, so that
schema-driven tools (schemathesis, client generators) can use and check it."""
from __future__ import annotations

from typing import Any

_NUM = {"type": "number"}
_INT = {"type": "integer"}
_BOOL = {"type": "boolean"}
_STR = {"type": "string"}
_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


_SAMPLING: dict[str, tuple[dict, str]] = {
    "n": ({**_INT, "minimum": 1}, "choices per prompt"),
    "best_of": ({**_INT, "minimum": 1}, "jobs per prompt; the n with the highest cumulative logprob are returned"),
    "max_tokens": ({**_INT, "minimum": 0}, "tokens to generate (0 only with echo); default: 16 (completions), "
                                           "the rest of the context (chat)"),
    "min_tokens": ({**_INT, "minimum": 0}, "EOS and stop_token_ids are banned until this many tokens exist"),
    "temperature": ({**_NUM, "minimum": 0, "maximum": 2}, "below 1e-5: greedy"),
    "top_p": ({**_NUM, "exclusiveMinimum": 0, "maximum": 1}, ""),
    "top_k": ({**_INT, "minimum": -1}, "-1 or 0: off"),
    "min_p": ({**_NUM, "minimum": 0, "maximum": 1}, "relative to the most likely token"),
    "seed": ({**_INT, "minimum": -(2**63), "maximum": 2**64 - 1}, "64-bit; choice j uses seed + j"),
    "stop": ({"anyOf": [_STR, {"type": "array", "items": _STR, "maxItems": 16}]}, "stop strings"),
    "stop_token_ids": (_IDS, ""),
    "ignore_eos": (_BOOL, ""),
    "presence_penalty": ({**_NUM, "minimum": -2, "maximum": 2}, ""),
    "frequency_penalty": ({**_NUM, "minimum": -2, "maximum": 2}, ""),
    "repetition_penalty": ({**_NUM, "exclusiveMinimum": 0}, ""),
    "logit_bias": ({"type": "object", "additionalProperties": {**_NUM, "minimum": -100, "maximum": 100}},
                   "token id (as a string) -> bias added to its logit"),
    "allowed_token_ids": (_IDS, "only these tokens may be sampled"),
    "bad_words": ({"type": "array", "items": {**_STR, "minLength": 1}}, "words never completed"),
    "prompt_logprobs": ({**_INT, "minimum": 0}, "logprobs of the prompt tokens and their top k (not when streaming)"),
    "echo": (_BOOL, "completions: the prompt before the output; chat: the last assistant message before the reply"),
    "skip_special_tokens": (_BOOL, ""),
    "spaces_between_special_tokens": ({"const": True}, ""),
    "include_stop_str_in_output": (_BOOL, ""),
    "stream": (_BOOL, "server-sent events"),
    "stream_options": ({"type": "object", "properties": {"include_usage": _BOOL}, "additionalProperties": False},
                       "only with stream"),
    "user": (_STR, "a label for the logs"),
    "response_format": ({"type": "object", "properties": {
        "type": {"enum": ["text", "json_object", "json_schema"]},
        "json_schema": {"type": "object", "properties": {"name": _STR, "schema": {"type": "object"},
                                                         "strict": _BOOL}}},
        "required": ["type"]}, "structured output"),
    "guided_json": ({"anyOf": [{"type": "object"}, _STR]}, "a JSON schema the output must match"),
    "guided_regex": (_STR, ""),
    "guided_choice": ({"type": "array", "items": _STR, "minItems": 1}, ""),
    "guided_grammar": (_STR, "Lark or GBNF"),
    "guided_whitespace_pattern": (_STR, ""),
    "guided_decoding_backend": ({"enum": ["auto", "guidance", "llguidance"]}, ""),
    "structured_outputs": ({"type": "object", "properties": {
        "json": {"anyOf": [{"type": "object"}, _STR]}, "regex": _STR, "choice": {"type": "array", "items": _STR},
        "grammar": _STR, "json_object": _BOOL, "disable_any_whitespace": _BOOL,
        "disable_additional_properties": _BOOL, "whitespace_pattern": _STR}, "additionalProperties": False},
        "vLLM's structured outputs"),
    "truncate_prompt_tokens": ({**_INT, "minimum": -1}, "keep the last k prompt tokens (-1: the context length)"),
    "add_special_tokens": (_BOOL, ""),
    "request_id": (_STR, "used in the response id"),
    "use_beam_search": ({"const": False}, "beam search is not supported"),
    "length_penalty": ({"const": 1}, "beam search only"),
    "priority": ({"enum": [0, 1]}, "0: interactive; 1: the batch class (runs on the capacity interactive "
                 "requests leave; docs/queue.md)"),
}

_MESSAGE = {"type": "object", "required": ["role"], "additionalProperties": False, "properties": {
    "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
    "content": {"anyOf": [_STR, {"type": "null"}, {"type": "array", "items": {
        "type": "object", "required": ["type", "text"], "properties": {"type": {"const": "text"}, "text": _STR}}}]},
    "name": _STR, "tool_call_id": _STR, "tool_calls": {"type": "array", "items": {
        "type": "object", "required": ["function"], "properties": {
            "id": _STR, "type": {"const": "function"}, "function": {
                "type": "object", "required": ["name"], "properties": {
                    "name": _STR, "arguments": {"anyOf": [{"type": "object"}, {**_STR, "contentMediaType":
                                                                                 "application/json"}]}}}}}}}}

_TOOL = {"type": "object", "required": ["function"], "properties": {
    "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": {**_STR, "minLength": 1}, "description": _STR, "parameters": {"type": "object"}}}}}

_CHAT_ONLY: dict[str, tuple[dict, str]] = {
    "max_completion_tokens": ({**_INT, "minimum": 1}, "same as max_tokens"),
    "logprobs": (_BOOL, "logprobs of the output tokens"),
    "top_logprobs": ({**_INT, "minimum": 0}, "alternatives per token (with logprobs)"),
    "tools": ({"type": "array", "items": _TOOL, "minItems": 1}, "functions the model may call"),
    "tool_choice": ({"anyOf": [{"enum": ["none", "auto", "required"]}, {
        "type": "object", "required": ["function"], "properties": {
            "type": {"const": "function"}, "function": {"type": "object", "required": ["name"],
                                                        "properties": {"name": _STR}}}}]}, ""),
    "parallel_tool_calls": (_BOOL, ""),
    "chat_template": (_STR, "a Jinja chat template instead of the model's"),
    "chat_template_kwargs": ({"type": "object"}, "extra template variables"),
    "continue_final_message": (_BOOL, "continue the last (assistant) message"),
    "add_generation_prompt": (_BOOL, ""),
    "documents": ({"type": "array", "items": {"type": "object"}}, "for templates that render documents"),
}


def _props(table: dict[str, tuple[dict, str]]) -> dict:
    return {k: ({**schema, "description": desc} if desc else schema) for k, (schema, desc) in table.items()}


_USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"], "properties": {
    "prompt_tokens": _INT, "completion_tokens": _INT, "total_tokens": _INT}}
_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": _STR, "type": _STR, "param": _nullable(_STR), "code": _nullable(_STR)}}}}
_MODEL = {"type": "object", "required": ["id", "object", "created", "owned_by", "max_model_len"], "properties": {
    "id": _STR, "object": {"const": "model"}, "created": _INT, "owned_by": _STR, "root": _STR,
    "parent": {"type": "null"}, "max_model_len": _INT}}
_FINISH = _nullable({"enum": ["stop", "length", "tool_calls"]})
_COMPLETION_RESPONSE = {"type": "object", "required": ["id", "object", "created", "model", "choices"], "properties": {
    "id": _STR, "object": {"const": "text_completion"}, "created": _INT, "model": _STR, "usage": _nullable(_USAGE),
    "choices": {"type": "array", "items": {"type": "object", "required": ["index", "text", "finish_reason"],
                                           "properties": {"index": _INT, "text": _STR, "finish_reason": _FINISH,
                                                          "logprobs": _nullable({"type": "object"}),
                                                          "prompt_logprobs": _nullable({"type": "array"})}}}}}
_CHAT_MESSAGE = {"type": "object", "required": ["role"], "additionalProperties": False, "properties": {
    "role": {"const": "assistant"}, "content": _nullable(_STR), "tool_calls": {"type": "array", "items": {
        "type": "object", "required": ["id", "type", "function"], "properties": {
            "id": _STR, "type": {"const": "function"}, "function": {
                "type": "object", "required": ["name", "arguments"],
                "properties": {"name": _STR, "arguments": _STR}}}}}}}
_CHAT_RESPONSE = {"type": "object", "required": ["id", "object", "created", "model", "choices"], "properties": {
    "id": _STR, "object": {"const": "chat.completion"}, "created": _INT, "model": _STR, "usage": _nullable(_USAGE),
    "prompt_logprobs": _nullable({"type": "array"}),
    "choices": {"type": "array", "items": {"type": "object", "required": ["index", "message", "finish_reason"],
                                           "properties": {"index": _INT, "message": _CHAT_MESSAGE,
                                                          "finish_reason": _FINISH,
                                                          "logprobs": _nullable({"type": "object"})}}}}}
_HEALTH = {"type": "object", "required": ["status"], "properties": {
    "status": {"enum": ["ok", "unavailable"]}, "gateway": _STR, "pending_requests": _INT,
    "scheduler": {"type": "array", "items": _STR}, "worker": {"type": "array", "items": _STR},
    "kvstore": {"type": "array", "items": _STR}}}


_FILE = {"type": "object", "required": ["id", "object", "bytes", "created_at", "filename", "purpose", "status"],
         "properties": {"id": _STR, "object": {"const": "file"}, "bytes": _INT, "created_at": _INT,
                        "filename": _STR, "purpose": {"enum": ["batch", "batch_output"]},
                        "status": {"const": "processed"}, "status_details": {"type": "null"},
                        "expires_at": {"type": "null"}}}
_TIME = _nullable(_INT)
_BATCH = {"type": "object", "required": ["id", "object", "endpoint", "input_file_id", "completion_window", "status",
                                         "created_at", "request_counts"], "properties": {
    "id": _STR, "object": {"const": "batch"}, "endpoint": {"enum": ["/v1/completions", "/v1/chat/completions"]},
    "errors": {"type": "null"}, "input_file_id": _STR, "completion_window": {"const": "24h"},
    "status": {"enum": ["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                        "cancelled"]},
    "output_file_id": _nullable(_STR), "error_file_id": _nullable(_STR), "created_at": _INT,
    "in_progress_at": _TIME, "expires_at": _TIME, "finalizing_at": _TIME, "completed_at": _TIME,
    "failed_at": _TIME, "expired_at": _TIME, "cancelling_at": _TIME, "cancelled_at": _TIME,
    "request_counts": {"type": "object", "required": ["total", "completed", "failed"],
                       "properties": {"total": _INT, "completed": _INT, "failed": _INT}},
    "metadata": _nullable({"type": "object", "additionalProperties": _STR})}}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_NUMN = _nullable(_NUM)
_DIST = {"type": "object", "required": ["count", "mean", "p50", "p90", "p99", "hist"], "properties": {
    "count": _INT, "mean": _NUMN, "p50": _NUMN, "p90": _NUMN, "p99": _NUMN,
    "hist": {"type": "array", "items": _INT, "description": "requests per bin of bin_edges"}}}
_SNAPSHOT_JOB = {"type": "object", "required": ["job_id", "level", "state", "kv", "generated", "charge", "join_level",
                                                "prompt_len"], "properties": {
    "job_id": _STR, "level": _INT, "state": {"enum": ["running", "in_flight", "waiting", "host", "moving"]},
    "kv": {"enum": ["none", "gpu", "host", "to_host", "to_gpu"]}, "generated": _INT, "charge": _NUM,
    "join_level": _INT, "prompt_len": _INT}}
_REPLICA_VIEW = {"type": "object", "required": [
    "instance_id", "replica", "age_s", "policy", "kv_policy", "max_batch_size", "iteration", "slo", "num_jobs",
    "num_running", "levels", "kv", "counters", "tokens", "rates", "loop"], "properties": {
    "instance_id": _STR, "replica": _STR, "age_s": _NUM, "policy": _STR, "kv_policy": _STR, "max_batch_size": _INT,
    "iteration": _INT, "slo": _NUM, "num_jobs": _INT, "num_running": _INT, "tokens": _INT,
    "levels": {"type": "array", "items": {"type": "object", "required": ["level", "quantum", "num_jobs", "more", "jobs"],
                                          "properties": {"level": _INT, "quantum": _NUMN, "num_jobs": _INT,
                                                         "more": _INT, "jobs": {"type": "array",
                                                                                "items": _SNAPSHOT_JOB}}}},
    "kv": {"type": "object", "additionalProperties": _INT},
    "counters": {"type": "object", "additionalProperties": _INT},
    "rates": {"type": "object", "additionalProperties": _NUM},
    "loop": {"type": "object", "additionalProperties": _NUMN}}}
_DASHBOARD = {"type": "object", "required": ["ts", "gateway", "model", "replicas", "latency"], "properties": {
    "ts": _NUM, "gateway": _STR, "model": _STR, "replicas": {"type": "array", "items": _REPLICA_VIEW},
    "latency": {"type": "object", "required": ["window_s", "requests", "bin_edges", "ttft", "norm_latency"],
                "properties": {"window_s": _NUM, "requests": _INT, "bin_edges": {"type": "array", "items": _NUM},
                               "ttft": _DIST, "norm_latency": _DIST}}},
    "description": "fields: docs/services.md, Dashboard"}


def _errors(*codes: int) -> dict:
    text = {400: "invalid request (the parameter is named)", 401: "missing or wrong API key",
            404: "unknown model, file or batch", 409: "the batch has ended", 429: "too many requests in flight",
            500: "the backend failed", 503: "no backend or a full queue"}
    return {str(c): _json({"$ref": "#/components/schemas/Error"}, text[c]) for c in codes}


def openapi_document(model_name: str, vocab_size: int) -> dict[str, Any]:
    """Cross-field limits (prompt + max_tokens within the context, min_tokens
    <= max_tokens, best_of >= n, ...) are beyond JSON Schema: they are 400s."""
    model_param = {"type": "string", "description": f"this server serves {model_name!r}"}
    token_ids = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": vocab_size - 1}}
    completion_req = {"type": "object", "required": ["model", "prompt"], "additionalProperties": False,
                      "properties": {"model": model_param, "prompt": {"anyOf": [
                          _STR, {"type": "array", "items": _STR, "minItems": 1}, {**_IDS, "minItems": 1},
                          {"type": "array", "items": {**_IDS, "minItems": 1}, "minItems": 1}]},
                          "suffix": {"anyOf": [{"const": ""}, {"type": "null"}], "description": "not supported"},
                          "logprobs": {**_INT, "minimum": 0, "description": "top logprobs per output token"},
                          **_props(_SAMPLING)}}
    chat_req = {"type": "object", "required": ["model", "messages"], "additionalProperties": False,
                "properties": {"model": model_param,
                               "messages": {"type": "array", "items": _MESSAGE, "minItems": 1},
                               **_props({k: v for k, v in _SAMPLING.items() if k != "echo"}),
                               "echo": (_BOOL | {"description": _SAMPLING["echo"][1]}),
                               **_props(_CHAT_ONLY)}}
    generate_errors = _errors(400, 401, 404, 429, 500, 503)
    stream_ok = {"text/event-stream": {"schema": _STR}}
    security = [{"bearer": []}]
    dashboard_security = [{"bearer": []}, {"basic": []}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "fastserve", "version": "1",
                 "description": "OpenAI-compatible API (vLLM's extensions included). Parameters not listed are "
                                "refused with 400."},
        "components": {
            "schemas": {"Error": _ERROR, "Model": _MODEL, "File": _FILE, "Batch": _BATCH},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "only when the server was started with API keys"},
                                "basic": {"type": "http", "scheme": "basic",
                                          "description": "the dashboard's paths only: any user, the API key as "
                                                         "password (what a browser asks for)"}},
        },
        "paths": {
            "/v1/completions": {"post": {
                "summary": "Text completion", "security": security,
                "requestBody": {"required": True, "content": {"application/json": {"schema": completion_req}}},
                "responses": {"200": {"description": "the completion (SSE chunks when stream is true)", "content": {
                    "application/json": {"schema": _COMPLETION_RESPONSE}, **stream_ok}}, **generate_errors}}},
            "/v1/chat/completions": {"post": {
                "summary": "Chat completion", "security": security,
                "requestBody": {"required": True, "content": {"application/json": {"schema": chat_req}}},
                "responses": {"200": {"description": "the reply (SSE chunks when stream is true)", "content": {
                    "application/json": {"schema": _CHAT_RESPONSE}, **stream_ok}}, **generate_errors}}},
            "/v1/models": {"get": {
                "summary": "The served model", "security": security,
                "responses": {"200": _json({"type": "object", "required": ["object", "data"], "properties": {
                    "object": {"const": "list"}, "data": {"type": "array", "items": {
                        "$ref": "#/components/schemas/Model"}}}}, "models"), **_errors(401)}}},
            "/v1/models/{model_id}": {"get": {
                "summary": "One model", "security": security,
                "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": _STR}],
                "responses": {"200": _json({"$ref": "#/components/schemas/Model"}, "the model"),
                              **_errors(401, 404)}}},
            **_batch_paths(security),
            "/health": {"get": {"summary": "Liveness of the backend", "responses": {
                "200": _json(_HEALTH, "scheduler and worker alive"), "503": _json(_HEALTH, "no backend")}}},
            "/ping": {
                "get": {"summary": "Same as /health (vLLM)", "responses": {
                    "200": _json(_HEALTH, "alive"), "503": _json(_HEALTH, "no backend")}},
                "post": {"summary": "Same as /health (vLLM)", "responses": {
                    "200": _json(_HEALTH, "alive"), "503": _json(_HEALTH, "no backend")}}},
            "/version": {"get": {"summary": "The server's version", "responses": {
                "200": _json({"type": "object", "required": ["version"], "properties": {"version": _STR}},
                             "version")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
                "200": {"description": "text exposition format", "content": {"text/plain": {"schema": _STR}}}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {
                "200": _json({"type": "object"}, "OpenAPI 3.1")}}},
            "/dashboard": {"get": {
                "summary": "The live dashboard page", "security": dashboard_security,
                "responses": {"200": {"description": "HTML", "content": {"text/html": {"schema": _STR}}},
                              **_errors(401)}}},
            "/dashboard/static/{name}": {"get": {
                "summary": "The dashboard's script and style sheet", "security": dashboard_security,
                "parameters": [{"name": "name", "in": "path", "required": True,
                                "schema": {"enum": ["dashboard.js", "dashboard.css"]}}],
                "responses": {"200": {"description": "the file", "content": {
                    "text/javascript": {"schema": _STR}, "text/css": {"schema": _STR}}}, **_errors(401)}}},
            "/dashboard/snapshot": {"get": {
                "summary": "What every scheduler is doing (MLFQ levels, KV, rates) and recent request latencies",
                "security": dashboard_security,
                "responses": {"200": _json(_DASHBOARD, "the dashboard's view"), **_errors(401)}}},
            "/dashboard/stream": {"get": {
                "summary": "The same view as server-sent events, about 3 a second, until the client leaves",
                "security": dashboard_security,
                "responses": {"200": {"description": "`data: <view>` events", "content": {
                    "text/event-stream": {"schema": _STR}}}, **_errors(401)}}},
            "/tokenize": {"post": {
                "summary": "Tokenize a prompt or chat messages", "security": security,
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "additionalProperties": False, "properties": {
                        "model": model_param, "prompt": _STR, "add_special_tokens": _BOOL,
                        "messages": {"type": "array", "items": _MESSAGE, "minItems": 1}},
                    "oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]}}}},
                "responses": {"200": _json({"type": "object", "required": ["tokens", "count", "max_model_len"],
                                            "properties": {"tokens": _IDS, "count": _INT, "max_model_len": _INT}},
                                           "token ids"), **_errors(400, 401, 404)}}},
            "/detokenize": {"post": {
                "summary": "Token ids to text", "security": security,
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["tokens"], "additionalProperties": False,
                    "properties": {"model": model_param, "tokens": token_ids}}}}},
                "responses": {"200": _json({"type": "object", "required": ["prompt"], "properties": {
                    "prompt": _STR}}, "text"), **_errors(400, 401, 404)}}},
        },
    }


def _batch_paths(security: list) -> dict:
    """OpenAI's Files (purpose batch) and Batches endpoints (gateway/batch_api.py)."""
    file_ref, batch_ref = {"$ref": "#/components/schemas/File"}, {"$ref": "#/components/schemas/Batch"}
    file_id = [{"name": "file_id", "in": "path", "required": True, "schema": _STR}]
    batch_id = [{"name": "batch_id", "in": "path", "required": True, "schema": _STR}]
    return {
        "/v1/files": {"post": {
            "summary": "Upload a batch input file (JSONL)", "security": security,
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                "type": "object", "required": ["file", "purpose"], "additionalProperties": False, "properties": {
                    "file": {"type": "string", "format": "binary"}, "purpose": {"const": "batch"}}}}}},
            "responses": {"200": _json(file_ref, "the file"), **_errors(400, 401)}}},
        "/v1/files/{file_id}": {"get": {
            "summary": "A file", "security": security, "parameters": file_id,
            "responses": {"200": _json(file_ref, "the file"), **_errors(401, 404)}}},
        "/v1/files/{file_id}/content": {"get": {
            "summary": "A file's content", "security": security, "parameters": file_id,
            "responses": {"200": {"description": "JSONL", "content": {"application/jsonl": {"schema": _STR}}},
                          **_errors(401, 404)}}},
        "/v1/batches": {
            "post": {
                "summary": "Run a batch: the requests of an uploaded file, queued below interactive traffic",
                "security": security,
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["input_file_id", "endpoint", "completion_window"],
                    "additionalProperties": False, "properties": {
                        "input_file_id": _STR, "endpoint": {"enum": ["/v1/completions", "/v1/chat/completions"]},
                        "completion_window": {"const": "24h"},
                        "metadata": _nullable({"type": "object", "additionalProperties": _STR})}}}}},
                "responses": {"200": _json(batch_ref, "the batch"), **_errors(400, 401, 404)}},
            "get": {
                "summary": "Batches, newest first", "security": security,
                "parameters": [{"name": "after", "in": "query", "required": False, "schema": _STR},
                               {"name": "limit", "in": "query", "required": False,
                                "schema": {**_INT, "minimum": 1, "maximum": 100}}],
                "responses": {"200": _json({"type": "object", "required": ["object", "data", "has_more"],
                                            "properties": {"object": {"const": "list"}, "data": {
                                                "type": "array", "items": batch_ref},
                                                "first_id": _nullable(_STR), "last_id": _nullable(_STR),
                                                "has_more": _BOOL}}, "batches"), **_errors(400, 401)}}},
        "/v1/batches/{batch_id}": {"get": {
            "summary": "A batch", "security": security, "parameters": batch_id,
            "responses": {"200": _json(batch_ref, "the batch"), **_errors(401, 404)}}},
        "/v1/batches/{batch_id}/cancel": {"post": {
            "summary": "Cancel a batch: requests not yet run end with code batch_cancelled", "security": security,
            "parameters": batch_id,
            "responses": {"200": _json(batch_ref, "the batch, cancelling"), **_errors(401, 404, 409)}}},
    }
