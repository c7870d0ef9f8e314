"""`fastserve make-model | generate | profile` (heavy imports stay inside the
commands so `fastserve --help` stays fast)."""
from __future__ import annotations

import argparse
import json
import sys


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--gpu-kv-blocks", type=int, default=None, help="device KV pool size in blocks (default: automatic)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 is steadier on a machine shared with other work)")


def _set_threads(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def register(subparsers) -> None:
    p = subparsers.add_parser("make-model", help="write a random-weight Hugging Face checkpoint with a real tokenizer")
    p.add_argument("out_dir")
    p.add_argument("--arch", default="llama", choices=["llama", "mistral", "qwen2"])
    p.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_model)

    p = subparsers.add_parser("generate", help="offline batch generation through the engine")
    _engine_args(p)
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message with the chat template")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    p.set_defaults(func=_generate)

    p = subparsers.add_parser("profile", help="measure prefill/decode step times into a JSON profile for the scheduler")
    _engine_args(p)
    p.add_argument("--out", required=True, help="profile JSON path")
    p.add_argument("--quick", action="store_true", help="fewer, shorter measurements")
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(func=_profile)
    # `fastserve worker` (the worker service) is registered by fastserve.deploy.launcher.


def _make_model(args) -> int:
    from fastserve.gpu_worker.model_maker import make_model

    path = make_model(args.out_dir, arch=args.arch, preset=args.preset, seed=args.seed)
    print(f"wrote a random-weight {args.arch} ({args.preset}) checkpoint to {path}")
    return 0


def _generate(args) -> int:
    from fastserve.gpu_worker.llm import LLM
    from fastserve.common.sampling_params import SamplingParams

    _set_threads(args)
    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                max_tokens=args.max_tokens, ignore_eos=args.ignore_eos)
        llm = LLM(args.model, dtype=args.dtype, device=args.device, block_size=args.block_size,
                  num_gpu_blocks=args.gpu_kv_blocks)
        prompts = args.prompt
        if args.chat:
            from fastserve.common.tokenizer import ChatTemplate

            tmpl = ChatTemplate.from_model_dir(args.model)
            prompts = [tmpl.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
        outputs = llm.generate(prompts, params)
    except (ValueError, FileNotFoundError) as exc:
        print(f"fastserve generate: error: {exc}", file=sys.stderr)
        return 2
    for prompt, out in zip(args.prompt, outputs):
        if args.json:
            print(json.dumps({"prompt": prompt, "prompt_token_ids": out.prompt_token_ids, "token_ids": out.token_ids,
                              "text": out.text, "finish_reason": out.finish_reason}, ensure_ascii=False))
        else:
            print(f"{prompt!r} -> {out.text!r} ({len(out.token_ids)} tokens, {out.finish_reason})")
    return 0


def _profile(args) -> int:
    from fastserve.gpu_worker.engine import Engine
    from fastserve.gpu_worker.profiler import profile_engine

    _set_threads(args)
    engine = Engine(args.model, dtype=args.dtype, device=args.device, block_size=args.block_size,
                    num_gpu_blocks=args.gpu_kv_blocks)
    result = profile_engine(engine, quick=args.quick, repeats=args.repeats)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}: {len(result['prefill'])} prefill and {len(result['decode'])} decode points")
    return 0
