"""The one `fastserve` command (the top of the dependency graph: it may name
every service; services only import common). Each service folder contributes its own
subcommands through a `cli.py` with `register(subparsers)`; imports stay lazy
so that `fastserve --help` does not import torch."""
from __future__ import annotations

import argparse
import importlib
import json
import sys

# Modules that contribute subcommands, in help order.
_COMMAND_MODULES = (
    "fastserve.gpu_worker.cli",  # make-model, generate, profile, worker
    "fastserve.scheduler.cli",  # sim, bench, scheduler
    "fastserve.gateway.cli",  # gateway
    "fastserve.launcher",  # up, scheduler, worker, kvstore
    "fastserve.run_batch",  # run-batch
)


def _register_generate(subparsers) -> None:
    from fastserve.gpu_worker.cli import engine_args

    p = subparsers.add_parser("generate", help="offline batch generation through the engine")
    engine_args(p)
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



def _generate(args) -> int:
    from fastserve.gpu_worker.cli import set_threads
    from fastserve.llm import LLM
    from fastserve.common.sampling_params import SamplingParams

    set_threads(args)
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



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastserve",
        description="fastserve: LLM serving with iteration-level preemption (skip-join MLFQ) and proactive KV offload.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
        if name == "fastserve.gpu_worker.cli":
            _register_generate(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rc = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
