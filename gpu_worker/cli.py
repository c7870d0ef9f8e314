"""`fastserve make-model | profile` (heavy imports stay inside the
commands so `fastserve --help` stays fast)."""
from __future__ import annotations

import argparse
import json


def engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--gpu-kv-blocks", type=int, default=None, help="device KV pool size in blocks (default: automatic)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 is steadier on a machine shared with other work)")


def set_threads(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def register(subparsers) -> None:
    p = subparsers.add_parser("make-model", help="write a random-weight Hugging Face checkpoint with a real tokenizer")
    p.add_argument("out_dir")
    p.add_argument("--arch", default="llama", choices=["llama", "mistral", "qwen2"])
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "1b"],
                   help="tiny (0.7M parameters, tests), small (28M, CPU benchmarks), 1b (Llama-3.2-1B's shapes, "
                        "bfloat16, 2.5 GB: GPU benchmarks)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_model)

    p = subparsers.add_parser("profile", help="measure prefill/decode step times into a JSON profile for the scheduler")
    engine_args(p)
    p.add_argument("--out", required=True, help="profile JSON path")
    p.add_argument("--quick", action="store_true", help="fewer, shorter measurements")
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(func=_profile)
    # `fastserve worker` (the service) is registered by fastserve.launcher, `generate` by fastserve.cli.


def _make_model(args) -> int:
    from fastserve.gpu_worker.model_maker import make_model

    path = make_model(args.out_dir, arch=args.arch, preset=args.preset, seed=args.seed)
    print(f"wrote a random-weight {args.arch} ({args.preset}) checkpoint to {path}")
    return 0


def _profile(args) -> int:
    from fastserve.gpu_worker.engine import Engine
    from fastserve.gpu_worker.profiler import profile_engine

    set_threads(args)
    engine = Engine(args.model, dtype=args.dtype, device=args.device, block_size=args.block_size,
                    num_gpu_blocks=args.gpu_kv_blocks)
    result = profile_engine(engine, quick=args.quick, repeats=args.repeats)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}: {len(result['prefill'])} prefill and {len(result['decode'])} decode points")
    return 0
