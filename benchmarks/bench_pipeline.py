"""Pipeline parallelism on the CPU: saturated decode of the `small` model split
over two stages (one torch thread each, gloo between them) with two batches in
flight, against the same with one batch in flight and against one unsplit
Engine with two threads; plus what the pipeline costs per iteration.

    python benchmarks/bench_pipeline.py [--model DIR] [--jobs 32] [--prompt-len 64] [--iterations 48] [--repeats 3]
                                        [--device cuda [--backend gloo]]

Every run decodes the same jobs in two alternating batches of jobs/2 (a job
is in every other batch, so its next token is back before it runs again).
The three modes are interleaved in each repeat (the unsplit Engine runs in the
leader's process while stage 1 idles) so that load from other processes hits
all alike; figures are medians over repeats. Prints one JSON object (also
written to --out). On CUDA rank r uses GPU r modulo the GPUs; with one GPU
pass --backend gloo (NCCL refuses two ranks on one device; activations then
cross through host memory) and read the ratio as a check of the in-flight
logic, not of NCCL."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import deque


def _jobs(vocab: int, n: int, prompt_len: int, iterations: int, block_size: int = 16):
    import torch

    g = torch.Generator().manual_seed(0)
    prompts = {f"j{i}": torch.randint(4, vocab, (prompt_len,), generator=g).tolist() for i in range(n)}
    per = -(-(prompt_len + iterations) // block_size)
    blocks = {j: list(range(i * per, (i + 1) * per)) for i, j in enumerate(prompts)}
    return prompts, blocks, n * per


def _decode(submit, prompts, blocks, iterations: int, in_flight: int):
    """Prefill (not timed), then `iterations` decode batches alternating
    between the two halves, at most `in_flight` outstanding. -> (tok/s, outputs)."""
    from fastserve.common.sampling_params import SamplingParams
    from fastserve.gpu_worker.batch import SeqWork

    params = SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True)
    names = list(prompts)
    halves = [names[:len(names) // 2], names[len(names) // 2:]]
    last, done, generated = {}, {}, {j: 0 for j in names}
    for half in halves:
        for r in submit([SeqWork(j, prompts[j], 0, blocks[j], params) for j in half]).result().results:
            last[r.job_id] = r.token_id
            done[r.job_id], generated[r.job_id] = len(prompts[r.job_id]), 1
    queue, outputs, i = deque(), [], 0
    t0 = time.perf_counter()
    while i < iterations or queue:
        while i < iterations and len(queue) < in_flight:
            work = [SeqWork(j, [last[j]], done[j], blocks[j], params, num_generated=generated[j]) for j in halves[i % 2]]
            for j in halves[i % 2]:
                done[j] += 1
            queue.append(submit(work))
            i += 1
        out = queue.popleft().result()
        outputs.append(out)
        for r in out.results:
            last[r.job_id] = r.token_id
            generated[r.job_id] += 1
    seconds = time.perf_counter() - t0
    return iterations * len(halves[0]) / seconds, outputs


def _engine_submit(engine):
    from concurrent.futures import Future
    from types import SimpleNamespace

    def submit(work):
        f = Future()
        f.set_result(SimpleNamespace(results=engine.step(work)))
        return f
    return submit


def _description_cost(prompts, blocks, prompt_len: int, repeats: int = 2000) -> dict:
    """Bytes and msgpack encode + decode time of one decode batch's description."""
    from fastserve.common.sampling_params import SamplingParams
    from fastserve.gpu_worker.batch import SeqWork
    from fastserve.gpu_worker.stage_wire import decode_work, encode_work

    params = SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True)
    half = list(prompts)[:len(prompts) // 2]
    work = [SeqWork(j, [7], prompt_len, blocks[j], params, num_generated=1) for j in half]
    data = encode_work(work)
    t0 = time.perf_counter()
    for _ in range(repeats):
        encode_work(work)
    t1 = time.perf_counter()
    for _ in range(repeats):
        decode_work(data)
    t2 = time.perf_counter()
    return {"bytes": len(data), "encode_us": round((t1 - t0) / repeats * 1e6, 1),
            "decode_us": round((t2 - t1) / repeats * 1e6, 1)}


def _median(values) -> float:
    return round(statistics.median(values), 6)


def bench_rank(ctx, model_dir: str, args: dict):
    import torch

    from fastserve.gpu_worker.engine import Engine
    from fastserve.gpu_worker.launch import build_rank

    cfg_vocab = json.load(open(os.path.join(model_dir, "config.json")))["vocab_size"]
    prompts, blocks, num_blocks = _jobs(cfg_vocab, args["jobs"], args["prompt_len"], args["iterations"])
    part = build_rank(model_dir, ctx, num_gpu_blocks=num_blocks)
    if ctx.rank != 0:
        part.serve()
        return None
    single = Engine(model_dir, device=ctx.device, num_gpu_blocks=num_blocks)
    rows = {"pp2_two_in_flight": [], "pp2_one_in_flight": [], "pp1_two_threads": []}
    per_iter = {"two": [], "one": []}
    for _ in range(args["repeats"]):
        for mode, n in (("one", 1), ("two", 2)):
            tok_s, outs = _decode(part.submit, prompts, blocks, args["iterations"], n)
            rows[f"pp2_{mode}_in_flight"].append(tok_s)
            per_iter[mode] += outs
        torch.set_num_threads(2)
        tok_s, _ = _decode(_engine_submit(single), prompts, blocks, args["iterations"], 1)
        rows["pp1_two_threads"].append(tok_s)
        torch.set_num_threads(1)
    part.close()
    tok_s = {k: round(statistics.median(v), 1) for k, v in rows.items()}
    one = per_iter["one"]
    compute = [_median(o.stage_seconds[k] for o in one) for k in range(2)]
    latency = _median(o.latency_seconds for o in one)
    return {
        "decode_tok_s": tok_s,
        "ratio_two_vs_one_in_flight": round(tok_s["pp2_two_in_flight"] / tok_s["pp2_one_in_flight"], 2),
        "ratio_pp2_two_in_flight_vs_pp1": round(tok_s["pp2_two_in_flight"] / tok_s["pp1_two_threads"], 2),
        "per_iteration_one_in_flight": {
            "stage_compute_s": compute,
            "stage1_receive_s": _median(o.transfer_seconds[1] for o in one),
            "latency_s": latency,
            "pipeline_overhead_s": round(latency - sum(compute), 6),
            "overhead_fraction_of_latency": round((latency - sum(compute)) / latency, 3),
            "note": "stage1_receive: the description and activations after their header; overhead: latency "
                    "(submit to result) minus both stages' compute: two hops (activations, reply), "
                    "thread hand-offs and msgpack",
        },
        "per_iteration_two_in_flight": {
            "stage_compute_s": [_median(o.stage_seconds[k] for o in per_iter["two"]) for k in range(2)],
            "stage1_receive_s": _median(o.transfer_seconds[1] for o in per_iter["two"]),
            "latency_s": _median(o.latency_seconds for o in per_iter["two"]),
        },
        "activations_bytes_per_hop": args["jobs"] // 2 * single.model_config.hidden_size * 4,
        "description": _description_cost(prompts, blocks, args["prompt_len"]),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint dir (default: make a `small` llama)")
    ap.add_argument("--jobs", type=int, default=32, help="decode jobs, in two alternating batches")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=48, help="decode batches per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--backend", choices=["gloo"], help="gloo also for device tensors (several ranks on one GPU)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)

    import torch

    from fastserve.gpu_worker.launch import spawn_local
    from fastserve.gpu_worker.model_maker import make_model

    load_before = os.getloadavg()[0]
    tmp = None
    model_dir = args.model
    if model_dir is None:
        tmp = tempfile.TemporaryDirectory()
        model_dir = str(make_model(tmp.name, arch="llama", preset="small", seed=0))
    opts = {"jobs": args.jobs, "prompt_len": args.prompt_len, "iterations": args.iterations, "repeats": args.repeats}
    t0 = time.perf_counter()
    leader = spawn_local(bench_rank, 2, 1, (model_dir, opts), timeout=3600, threads=1, device=args.device,
                         backend=args.backend)[0]
    result = {
        "benchmark": "pipeline_parallel_decode",
        "model": "random-weight small llama (make_model preset=small, seed 0)" if args.model is None else args.model,
        "modes": {"pp2_two_in_flight": "2 stages x 1 torch thread, gloo, two batches in flight",
                  "pp2_one_in_flight": "the same, one batch in flight",
                  "pp1_two_threads": "one unsplit Engine, 2 torch threads, the same batches one after another"},
        "target": "ratio_two_vs_one_in_flight >= 1.6",
        **opts, "batch_size": args.jobs // 2,
        **leader,
        "device": args.device if args.device == "cpu" else f"{args.device} ({torch.cuda.get_device_name()}, "
                                                           f"backend {args.backend or 'nccl'})",
        "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "loadavg_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
