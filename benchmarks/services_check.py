"""Service-level checks on one device (the CUDA path on a lent GPU machine):
the whole backend (kvstore, worker, scheduler on the in-memory bus) under a
tiny GPU KV pool must offload and upload through the KV store's shared-memory
pool and still give exactly the tokens of the offline engine on the same
device. Prints one JSON object.

    python benchmarks/services_check.py --device cuda --model DIR
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import uuid


async def offload_check(model: str, device: str, n_jobs: int, prompt_len: int, max_tokens: int,
                        gpu_blocks: int) -> dict:
    sys.path.insert(0, ".")
    from fastserve.common.bus_memory import MemoryBus
    from fastserve.launcher import NodeConfig, Stack
    from fastserve.llm import LLM
    from fastserve.common.sampling_params import SamplingParams
    from tests.test_services_stack import Client

    rng = random.Random(0)
    prompts = [[rng.randrange(3, 1000) for _ in range(prompt_len)] for _ in range(n_jobs)]
    llm = LLM(model, device=device, num_gpu_blocks=4 * n_jobs * 8)
    want = [o.token_ids for o in llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                       ignore_eos=True))]
    del llm
    if True:
        # The pool at its default place, /dev/shm (tmpfs): what a deployment uses.
        cfg = NodeConfig(model=model, device=device, gpu_kv_blocks=gpu_blocks, host_kv_blocks=8 * gpu_blocks,
                         replica=f"chk{uuid.uuid4().hex[:6]}")
        bus = MemoryBus()
        await bus.connect()
        stack = await Stack(cfg, bus, services=("kvstore", "worker", "scheduler")).start()
        try:
            client = await Client(bus).start()
            t0 = time.perf_counter()
            ids = [await client.submit(p, max_tokens, ignore_eos=True) for p in prompts]
            finals = [await client.wait(j, timeout=300) for j in ids]
            wall = time.perf_counter() - t0
            equal = sum(client.tokens[j] == w for j, w in zip(ids, want))
            core = stack.scheduler.core
            return {"device": device, "jobs": n_jobs, "gpu_kv_blocks": gpu_blocks,
                    "errors": [f.error for f in finals if f.error][:3], "identical_outputs": equal,
                    "offloads": core.stats.offloads, "uploads": core.stats.uploads,
                    "kvstore": {k: stack.kvstore.stats[k] for k in ("offloads", "uploads", "blocks_moved", "copy_seconds")},
                    "worker_copy_seconds": stack.worker.stats["copy_seconds"], "wall_s": wall,
                    "host_pool_pinned": bool(stack.worker.engine.kv.host.is_pinned()),
                    "loop": stack.scheduler.times.summary()}
        finally:
            await stack.stop()
            await bus.close()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=40)
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--gpu-kv-blocks", type=int, default=16)
    p.add_argument("--out")
    args = p.parse_args()
    try:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
    except ImportError:
        pass
    from fastserve.common.logging import setup_logging

    setup_logging("services_check", "WARNING")
    res = asyncio.run(offload_check(args.model, args.device, args.jobs, args.prompt_len, args.max_tokens,
                                    args.gpu_kv_blocks))
    res["ok"] = res["identical_outputs"] == args.jobs and not res["errors"] and res["uploads"] > 0
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        open(args.out, "w").write(text + "\n")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
