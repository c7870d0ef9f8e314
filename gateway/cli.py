"""`fastserve gateway`: the OpenAI-compatible HTTP gateway as its own
process; `fastserve top`: a terminal view of a gateway's dashboard."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys

from fastserve.common.config import ConfigError, add_config_args, config_from_args

from fastserve.gateway.config import GatewayConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "gateway", help="run the OpenAI-compatible HTTP gateway",
        description="Serve /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics, "
                    "/tokenize, /detokenize and OpenAI's Batch API, and consume the submission queue "
                    "(docs/queue.md); jobs go to the schedulers over the broker. "
                    "Every flag can also be set as FASTSERVE_<FLAG> in the environment.")
    add_config_args(p, GatewayConfig)
    p.set_defaults(func=main)

    from fastserve.common import settings as S

    t = subparsers.add_parser(
        "top", help="watch the schedulers in a terminal (MLFQ levels, KV, rates, latency)",
        description="The essentials of a gateway's /dashboard, redrawn in place. Ctrl-C quits.")
    t.add_argument("--url", default=f"http://{S.HOST.default}:{S.PORT.default}", help="the gateway's base URL")
    t.add_argument("--api-key", default=os.environ.get("FASTSERVE_API_KEY"),
                   help="one of the gateway's API keys (env FASTSERVE_API_KEY)")
    t.set_defaults(func=_top)


def _top(args: argparse.Namespace) -> int:
    from fastserve.gateway.top import run

    return run(args.url, args.api_key)


def main(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(GatewayConfig, args)
    except ConfigError as exc:
        print(f"fastserve gateway: {exc}", file=sys.stderr)
        return 2
    from fastserve.common.logging import setup_logging

    setup_logging("gateway", config.log_level)
    asyncio.run(run_gateway(config))
    return 0


async def run_gateway(config: GatewayConfig, bus=None, stop: asyncio.Event | None = None) -> None:
    """Serve until `stop` is set (or SIGINT/SIGTERM when no event is given).
    A bus passed in must be connected and is left open; otherwise one is made
    from config.broker and closed at the end."""
    from aiohttp import web

    from fastserve.common.bus import make_bus

    from fastserve.gateway.app import create_app

    own_bus = bus is None
    if own_bus:
        bus = make_bus(config.broker, namespace=config.namespace, connection_name=f"gateway-{config.instance_id}")
        await bus.connect()
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)  # the handler only sets a flag
    runner = web.AppRunner(create_app(config, bus), access_log=None, handler_cancellation=True)
    try:
        await runner.setup()
        await web.TCPSite(runner, config.host, config.port).start()
        print(f"fastserve gateway: serving {config.served_model_name} on http://{config.host}:{config.port}",
              file=sys.stderr, flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
        if own_bus:
            await bus.close()
