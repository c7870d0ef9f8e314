"""Engine throughput beside transformers' generate, same checkpoint, same
batch, same process: decode tokens/s and prefill tokens/s at batch 1, 8, 32.

    python benchmarks/bench_engine.py [--model DIR] [--batch-sizes 1,8,32] [--prompt-len 64] [--new-tokens 64]

Without --model a random-weight `small` llama is made in a temporary folder.
Prints one JSON object (also written to --out if given)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time


def _engine_run(engine, prompts, new_tokens):
    """Prefill all prompts in one step, then decode; returns (prefill_s, decode_s)."""
    from fastserve.gpu_worker.batch import SeqWork
    from fastserve.common.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    bs = engine.block_size
    per = -(-(len(prompts[0]) + new_tokens) // bs)
    tables = [list(range(i * per, (i + 1) * per)) for i in range(len(prompts))]
    t0 = time.perf_counter()
    results = engine.step([SeqWork(str(i), p, 0, tables[i], params) for i, p in enumerate(prompts)])
    t1 = time.perf_counter()
    last = [r.token_id for r in results]
    for step in range(1, new_tokens):
        work = [SeqWork(str(i), [last[i]], len(p) + step - 1, tables[i], params, num_generated=step)
                for i, p in enumerate(prompts)]
        last = [r.token_id for r in engine.step(work)]
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def _hf_run(model, prompts, new_tokens):
    """transformers' greedy generate; prefill = generate(max_new_tokens=1),
    decode = generate(new_tokens) minus that."""
    import torch

    ids = torch.tensor(prompts, device=model.device)
    mask = torch.ones_like(ids)
    kw = dict(do_sample=False, attention_mask=mask, pad_token_id=0)
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    with torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **kw)
        sync()
        t1 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, **kw)
        sync()
        t2 = time.perf_counter()
    assert out.shape[1] == ids.shape[1] + new_tokens, "generation stopped early"
    prefill = t1 - t0
    return prefill, (t2 - t1) - prefill


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _interleaved(engine_fn, hf_fn, repeats):
    """Alternate the two so that load from other processes on a shared
    machine hits both alike; the ratio is the median of per-pair ratios."""
    pairs = [(engine_fn(), hf_fn()) for _ in range(repeats)]
    out = {}
    for k, name in ((0, "prefill"), (1, "decode")):
        e = [p[0][k] for p in pairs]
        h = [p[1][k] for p in pairs]
        out[name] = {"engine_s": statistics.median(e), "transformers_s": statistics.median(h),
                     "ratio": statistics.median(hh / ee for ee, hh in zip(e, h))}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint dir (default: make a `small` llama)")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for both (default: torch's)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)

    import torch
    import transformers

    from fastserve.gpu_worker.engine import Engine
    from fastserve.gpu_worker.model_maker import make_model

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    tmp = None
    model_dir = args.model
    if model_dir is None:
        tmp = tempfile.TemporaryDirectory()
        model_dir = str(make_model(tmp.name, arch="llama", preset="small", seed=0))
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    engine = Engine(model_dir, dtype=args.dtype, device=args.device,
                    num_gpu_blocks=max(batch_sizes) * (-(-(args.prompt_len + args.new_tokens) // 16)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype))
    hf = hf.to(args.device).eval()
    hf.generation_config.eos_token_id = None  # always generate new_tokens, like ignore_eos

    g = torch.Generator().manual_seed(0)
    vocab = engine.model_config.vocab_size
    rows = []
    for b in batch_sizes:
        prompts = torch.randint(4, vocab, (b, args.prompt_len), generator=g).tolist()
        _engine_run(engine, prompts, 4)  # warm-up
        _hf_run(hf, prompts, 4)
        m = _interleaved(lambda: _engine_run(engine, prompts, args.new_tokens),
                         lambda: _hf_run(hf, prompts, args.new_tokens), args.repeats)
        tokens = {"decode": b * (args.new_tokens - 1), "prefill": b * args.prompt_len}
        row = {"batch_size": b}
        for name in ("decode", "prefill"):
            row[f"{name}_tok_s"] = {"engine": round(tokens[name] / m[name]["engine_s"], 1),
                                    "transformers": round(tokens[name] / m[name]["transformers_s"], 1)}
            row[f"{name}_ratio"] = round(m[name]["ratio"], 2)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    result = {
        "benchmark": "engine_vs_transformers",
        "model": "random-weight small llama (make_model preset=small, seed 0)" if args.model is None else args.model,
        "params_m": round(sum(p.numel() for p in hf.parameters()) / 1e6, 1),
        "device": args.device if args.device == "cpu" else f"{args.device} ({torch.cuda.get_device_name()})", "dtype": args.dtype, "torch_threads": torch.get_num_threads(),
        "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "loadavg_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "ratio_is": "engine tok/s / transformers tok/s; median over interleaved runs",
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "results": rows,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
