"""Structured output requests -> one llguidance grammar (a tokenizer-free
string the worker compiles against its tokenizer), checked here so that a bad
schema or regex is a 400, never a failed job.

Accepted, as vLLM accepts them: `response_format` {"type": "json_object"} or
{"type": "json_schema", "json_schema": {"schema": ...}}; the older
`guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` (with
`guided_whitespace_pattern`); and `structured_outputs` {"json" | "regex" |
"choice" | "grammar" | "json_object", "disable_any_whitespace",
"disable_additional_properties", "whitespace_pattern"}. At most one kind per
request. JSON allows any whitespace between tokens unless told otherwise, as
vLLM does."""
from __future__ import annotations

import copy
import json
from typing import Any

from fastserve.gateway.errors import bad

GUIDED_KEYS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
_BACKENDS = (None, "auto", "guidance", "llguidance")
_SO_KEYS = {"json", "regex", "choice", "grammar", "json_object", "disable_any_whitespace",
            "disable_additional_properties", "whitespace_pattern"}


def grammar_for(body: dict, forced_schema: dict | None = None) -> str | None:
    """The request's grammar, or None. forced_schema: a JSON schema the
    request implies (a named or required tool choice)."""
    import llguidance

    kinds: list[tuple[str, str, Any]] = []  # (param, kind, spec)
    options = {"whitespace_flexible": True, "whitespace_pattern": None, "no_additional": False}
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
            raise bad("'response_format' must be {'type': 'text' | 'json_object' | 'json_schema', ...}",
                      "response_format")
        if rf["type"] == "json_object":
            kinds.append(("response_format", "json", {"type": "object"}))
        elif rf["type"] == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
                raise bad("response_format 'json_schema' needs {'name': ..., 'schema': {...}}", "response_format")
            kinds.append(("response_format", "json", js.get("schema", {})))
    for key in GUIDED_KEYS:
        if body.get(key) is not None:
            kinds.append((key, key[len("guided_"):], body[key]))
    if body.get("guided_whitespace_pattern") is not None:
        options["whitespace_pattern"] = _str(body["guided_whitespace_pattern"], "guided_whitespace_pattern")
    if body.get("guided_decoding_backend") not in _BACKENDS:
        raise bad(f"'guided_decoding_backend' {body['guided_decoding_backend']!r} is not available; this server's "
                  "structured output is llguidance ('guidance')", "guided_decoding_backend")
    so = body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict) or set(so) - _SO_KEYS:
            raise bad(f"'structured_outputs' must be an object with keys among {sorted(_SO_KEYS)}",
                      "structured_outputs")
        for k in ("json", "regex", "choice", "grammar"):
            if so.get(k) is not None:
                kinds.append(("structured_outputs", k, so[k]))
        if so.get("json_object"):
            kinds.append(("structured_outputs", "json", {"type": "object"}))
        options["whitespace_flexible"] = not so.get("disable_any_whitespace", False)
        options["no_additional"] = bool(so.get("disable_additional_properties", False))
        if so.get("whitespace_pattern") is not None:
            options["whitespace_pattern"] = _str(so["whitespace_pattern"], "structured_outputs")
    if forced_schema is not None:
        kinds.append(("tool_choice", "json", forced_schema))
    if not kinds:
        return None
    if len(kinds) > 1:
        raise bad("only one kind of structured output per request (response_format, guided_json, guided_regex, "
                  f"guided_choice, guided_grammar, structured_outputs or a forced tool choice); got "
                  f"{', '.join(p for p, _, _ in kinds)}", kinds[1][0])
    param, kind, spec = kinds[0]
    try:
        if kind == "json":
            schema = json.loads(spec) if isinstance(spec, str) else spec
            if not isinstance(schema, (dict, bool)):
                raise ValueError("a JSON schema must be an object")
            if options["no_additional"]:
                schema = _no_additional_properties(copy.deepcopy(schema))
            defaults = {"whitespace_flexible": options["whitespace_flexible"]}
            if options["whitespace_pattern"] is not None:
                defaults["whitespace_pattern"] = options["whitespace_pattern"]
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=defaults)
        elif kind == "regex":
            grammar = llguidance.grammar_from("regex", _str(spec, param))
        elif kind == "choice":
            if not isinstance(spec, list) or not spec or not all(isinstance(c, str) for c in spec):
                raise ValueError("a choice must be a non-empty list of strings")
            grammar = llguidance.grammar_from("choice", spec)
        else:
            grammar = llguidance.grammar_from("grammar", _str(spec, param))
    except (ValueError, TypeError) as exc:
        raise bad(f"invalid {param}: {exc}", param) from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise bad(f"invalid {param}: {error.strip()}", param)
    return grammar


def _str(value: Any, param: str) -> str:
    if not isinstance(value, str) or not value:
        raise bad(f"'{param}' must be a non-empty string", param)
    return value


def _no_additional_properties(schema: Any) -> Any:
    """vLLM's disable_additional_properties: objects with properties allow no others."""
    if isinstance(schema, dict):
        for v in schema.values():
            _no_additional_properties(v)
        if ("properties" in schema or "patternProperties" in schema) and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        for v in schema:
            _no_additional_properties(v)
    return schema
