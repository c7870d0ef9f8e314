"""The one `fastserve` command (the top of the dependency graph: it may name
every service; services only import common). Each service folder contributes its own
subcommands through a `cli.py` with `register(subparsers)`; imports stay lazy
so that `fastserve --help` does not import torch."""
from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute subcommands, in help order.
_COMMAND_MODULES = (
    "fastserve.gpu_worker.cli",  # make-model, generate, profile, worker
    "fastserve.scheduler.cli",  # sim, bench, scheduler
    "fastserve.gateway.cli",  # gateway
    "fastserve.deploy.launcher",  # up, scheduler, worker, kvstore
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastserve",
        description="fastserve: LLM serving with iteration-level preemption (skip-join MLFQ) and proactive KV offload.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rc = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
