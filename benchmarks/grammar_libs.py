"""Which grammar library for structured output: llguidance, xgrammar and
outlines-core side by side on this machine, with the model's own tokenizer.

    pip install xgrammar outlines-core   # llguidance is already a dependency
    python benchmarks/grammar_libs.py [--model DIR] [--vocab 4096,9549] [--out FILE]

For each library and JSON schema: the time to build its tokenizer view, to
compile the schema, and per generated token the time to compute the next
token's mask and to advance past the token, following a valid instance of the
schema token by token. Prints one JSON object."""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

SCHEMAS = {
    "person": ({"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["name", "age"]},
        {"name": "Ada Lovelace", "age": 36, "email": "ada@example.com", "tags": ["math", "engines", "poetry"]}),
    "nested": ({"type": "object", "properties": {
        "id": {"type": "integer"}, "ok": {"type": "boolean"},
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "sku": {"type": "string"}, "qty": {"type": "integer"}, "price": {"type": "number"}},
            "required": ["sku", "qty"]}},
        "status": {"enum": ["new", "paid", "shipped"]}},
        "required": ["id", "items", "status"]},
        {"id": 7, "ok": True, "items": [{"sku": "a-1", "qty": 2, "price": 3.5}, {"sku": "b-22", "qty": 1}],
         "status": "paid"}),
}


def token_bytes(tokenizer) -> list[bytes]:
    import llguidance

    lt = llguidance.LLTokenizer(tokenizer.to_str())
    return [lt.decode_bytes([i]) for i in range(tokenizer.get_vocab_size())]


def run_llguidance(tokenizer, eos, schema, path):
    import llguidance
    import llguidance.torch as lt

    t0 = time.perf_counter()
    tok = llguidance.LLTokenizer(tokenizer.to_str(), eos_token=eos)
    t1 = time.perf_counter()
    m = llguidance.LLMatcher(tok, llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema)))
    assert not m.is_error(), m.get_error()
    t2 = time.perf_counter()
    mask = lt.allocate_token_bitmask(1, tok.vocab_size)
    return t1 - t0, t2 - t1, _follow(path, lambda: lt.fill_next_token_bitmask(m, mask, 0),
                                     lambda t: m.consume_token(t), mask)


def run_xgrammar(tokenizer, eos, schema, path, vocab_bytes):
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo(vocab_bytes, vocab_type=xgr.VocabType.RAW, vocab_size=len(vocab_bytes),
                             stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    t1 = time.perf_counter()
    m = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema)))
    t2 = time.perf_counter()
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)
    return t1 - t0, t2 - t1, _follow(path, lambda: m.fill_next_token_bitmask(mask), m.accept_token, mask)


def run_outlines(tokenizer, eos, schema, path, vocab_bytes):
    import torch
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    t0 = time.perf_counter()
    ids: dict[bytes, list[int]] = {}
    for i, b in enumerate(vocab_bytes):
        if i != eos and b:
            ids.setdefault(b, []).append(i)
    vocab = Vocabulary(eos, ids)
    t1 = time.perf_counter()
    guide = Guide(Index(build_regex_from_schema(json.dumps(schema)), vocab))
    t2 = time.perf_counter()
    mask = torch.zeros((len(vocab_bytes) + 31) // 32, dtype=torch.int32)

    def fill():
        guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())

    return t1 - t0, t2 - t1, _follow(path, fill, guide.advance, mask)


def _follow(path, fill, advance, mask) -> dict:
    """Mask then advance, token by token along `path`; each token must be allowed."""
    import torch

    masks, advances = [], []
    for t in path:
        a = time.perf_counter()
        fill()
        b = time.perf_counter()
        word = int(mask.view(-1)[t // 32])
        assert (word >> (t % 32)) & 1, f"token {t} of a valid instance was masked out"
        advance(t)
        c = time.perf_counter()
        masks.append(b - a)
        advances.append(c - b)
    del torch
    return {"tokens": len(path), "mask_us_mean": round(1e6 * statistics.mean(masks), 1),
            "mask_us_p99": round(1e6 * sorted(masks)[int(0.99 * (len(masks) - 1))], 1),
            "advance_us_mean": round(1e6 * statistics.mean(advances), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", default="4096,9549", help="BPE vocabulary sizes to build (model_maker's tokenizer)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from fastserve.gpu_worker.model_maker import EOS, build_tokenizer

    report = {"machine": platform.processor() or platform.machine(), "libraries": {}, "runs": []}
    for lib in ("llguidance", "xgrammar", "outlines_core"):
        try:
            from importlib.metadata import version

            report["libraries"][lib] = version(lib.replace("_", "-"))
        except Exception as exc:  # noqa: BLE001 - reported, not hidden
            report["libraries"][lib] = f"not installed: {exc}"
    for vocab_size in (int(v) for v in args.vocab.split(",")):
        tokenizer = build_tokenizer(vocab_size)
        vocab_bytes = token_bytes(tokenizer)
        for name, (schema, instance) in SCHEMAS.items():
            path = tokenizer.encode(json.dumps(instance), add_special_tokens=False).ids
            for lib, fn in (("llguidance", lambda: run_llguidance(tokenizer, EOS, schema, path)),
                            ("xgrammar", lambda: run_xgrammar(tokenizer, EOS, schema, path, vocab_bytes)),
                            ("outlines_core", lambda: run_outlines(tokenizer, EOS, schema, path, vocab_bytes))):
                row = {"vocab": len(vocab_bytes), "schema": name, "library": lib}
                try:
                    setup, compile_s, per_token = fn()
                    row.update(tokenizer_setup_ms=round(1e3 * setup, 2), compile_ms=round(1e3 * compile_s, 2),
                               **per_token)
                except Exception as exc:  # noqa: BLE001 - a library that fails here is a finding
                    row["error"] = f"{type(exc).__name__}: {exc}"
                report["runs"].append(row)
                print(json.dumps(row), flush=True)
    text = json.dumps(report, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
