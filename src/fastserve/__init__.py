"""fastserve: LLM serving with iteration-level preemption (skip-join MLFQ) and
proactive KV offload (FastServe, arXiv 2305.05920).

The package root (folder deploy/) is the composition layer, the only code
that may import every service: the `fastserve` command (cli.py), the
launcher that runs services in one process (launcher.py), and the offline
`LLM` (llm.py: the engine driven by the scheduler core). The services live in
fastserve.gateway, .scheduler, .gpu_worker and .kvstore and import only
fastserve.common.

    from fastserve import LLM, SamplingParams
"""
from __future__ import annotations

from typing import Any

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str) -> Any:
    # Lazy: `fastserve --help` and the services must not import torch for this.
    if name == "LLM":
        from fastserve.llm import LLM

        return LLM
    if name == "SamplingParams":
        from fastserve.common.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
