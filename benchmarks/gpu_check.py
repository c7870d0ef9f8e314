"""GPU checks of the engine's CUDA path, as one short script (a lent GPU
machine has minutes, not hours). Prints one JSON object; each figure comes
with its baseline from the same run.

    python benchmarks/gpu_check.py [--out gpu_check.json]

Checks:
- greedy tokens of the CUDA engine (float32, TF32 off) against transformers
  on the same GPU and the same files, per family (llama GQA, qwen2 qkv bias);
- bfloat16 runs and agrees with float32 on most tokens (reported, not exact);
- copy_out / overwrite / copy_in into other blocks: continuation unchanged;
- async copies: copy bandwidth, and a decode step timed alone, a copy timed
  alone, and both issued together (overlap => together < alone + alone);
- decode throughput of the engine vs transformers' generate (bench_engine).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fastserve.gpu_worker.batch import SeqWork
from fastserve.gpu_worker.engine import Engine
from fastserve.llm import LLM
from fastserve.gpu_worker.model_maker import make_model
from fastserve.common.sampling_params import SamplingParams

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def hf_greedy(model_dir, prompts, n, dtype):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to("cuda").eval()
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device="cuda")
            o = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
            outs.append(o[0, len(p):].tolist())
    return outs


def equivalence(tmp: Path, arch: str) -> dict:
    d = make_model(tmp / f"{arch}-tiny", arch, "tiny", seed=0)
    llm = LLM(str(d), device="cuda", dtype="float32")
    prompts = [llm.engine.tokenizer.encode(t).ids for t in
               ["Hello world, this is", "The quick brown fox jumps over the lazy dog and then", "a"]]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    ours = [o.token_ids for o in llm.generate(prompts, params)]
    ref = hf_greedy(d, prompts, 24, torch.float32)
    llm_bf = LLM(str(d), device="cuda", dtype="bfloat16")
    bf = [o.token_ids for o in llm_bf.generate(prompts, params)]
    agree = sum(a == b for x, y in zip(bf, ours) for a, b in zip(x, y)) / sum(len(x) for x in ours)
    return {"arch": arch, "greedy_identical_to_transformers_cuda": ours == ref,
            "bf16_token_agreement_with_fp32": round(agree, 3)}


def kv_roundtrip(tmp: Path) -> dict:
    d = make_model(tmp / "llama-rt", "llama", "tiny", seed=1)
    eng = Engine(d, device="cuda", num_gpu_blocks=64, num_host_blocks=16, block_size=16)
    p = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    prompt = eng.tokenizer.encode("Offload me to the host and bring me back unchanged").ids

    def run(table_a, table_b, swap_at):
        toks, ctx, table = [], 0, table_a
        new = prompt
        for i in range(30):
            r = eng.step([SeqWork("j", new, ctx, table, p, num_generated=i)])[0]
            ctx += len(new)
            toks.append(r.token_id)
            new = [r.token_id]
            if i == swap_at:
                nb = -(-ctx // 16)
                eng.copy_out(table[:nb], list(range(nb))).wait()
                eng.kv.gpu[:, :, table[:nb]] = torch.randn_like(eng.kv.gpu[:, :, table[:nb]])
                eng.copy_in(list(range(nb)), table_b[:nb]).wait()
                table = table_b
        return toks

    base = run(list(range(0, 8)), list(range(0, 8)), swap_at=-1)
    swapped = run(list(range(0, 8)), list(range(40, 48)), swap_at=10)
    return {"continuation_unchanged_after_copy_out_in": base == swapped}


def overlap(tmp: Path) -> dict:
    d = make_model(tmp / "llama-small", "llama", "small", seed=0)
    eng = Engine(d, device="cuda", num_gpu_blocks=4096, num_host_blocks=2048, block_size=16)
    p = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    bs, ctx = 32, 1024
    per = ctx // 16 + 1
    tables = [list(range(i * per, (i + 1) * per)) for i in range(bs)]
    work = [SeqWork(str(i), [1], ctx, tables[i], p, num_generated=1) for i in range(bs)]
    nblk = 1024
    src, dst = list(range(2048, 2048 + nblk)), list(range(nblk))

    def timed(fn, reps=5):
        fn(); torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / reps

    step_s = timed(lambda: eng.step(work))
    copy_s = timed(lambda: eng.copy_out(src, dst).wait())
    both_s = timed(lambda: (eng.copy_out(src, dst), eng.step(work), torch.cuda.synchronize()))
    gb = nblk * eng.bytes_per_block / 1e9
    return {"decode_step_s_batch32_ctx1024": step_s, "copy_out_s": copy_s, "copy_gb": gb,
            "copy_out_gb_per_s": gb / copy_s, "step_and_copy_together_s": both_s,
            "overlap_saving_ratio": (step_s + copy_s) / both_s}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        for name, fn in [("equivalence_llama", lambda: equivalence(tmp, "llama")),
                         ("equivalence_qwen2", lambda: equivalence(tmp, "qwen2")),
                         ("kv_roundtrip", lambda: kv_roundtrip(tmp)), ("overlap", lambda: overlap(tmp))]:
            try:
                out[name] = fn()
            except Exception as exc:  # report every check, even when one breaks
                out[name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(name, json.dumps(out[name]), file=sys.stderr, flush=True)
    bench = subprocess.run([sys.executable, "benchmarks/bench_engine.py", "--device", "cuda", "--repeats", "2",
                            "--new-tokens", "64", "--batch-sizes", "1,8,32"], capture_output=True, text=True)
    try:
        out["bench_engine_cuda"] = json.loads(bench.stdout)
    except ValueError:
        out["bench_engine_cuda"] = {"error": bench.stderr[-2000:]}
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
