"""Offline generation: `LLM(model_dir).generate(prompts, params)`.

The engine driven by the very scheduler core the services use (FCFS by
default, KV reserved for each job's whole output so nothing is ever
preempted: the classic continuous-batching loop), one iteration at a time:

    schedule() -> Engine.step(batch) -> update(finished)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastserve.common.sampling_params import SamplingParams
from fastserve.gpu_worker.batch import SeqWork
from fastserve.gpu_worker.engine import Engine
from fastserve.scheduler.core.config import SchedulerCoreConfig
from fastserve.scheduler.core.cost_model import CostModel
from fastserve.scheduler.core.placement import make_kv_policy
from fastserve.scheduler.core.scheduler import SchedulerCore
from fastserve.scheduler.core.types import IterationResult, JobSpec


@dataclass
class GenerationOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[float] = field(default_factory=list)
    # (logprob, rank, top) of prompt tokens 1.. when SamplingParams.prompt_logprobs is set
    prompt_logprobs: list | None = None


class LLM:
    def __init__(self, model, max_batch_size: int = 32, max_batch_tokens: int = 4096, policy: str = "fcfs",
                 kv_policy: str = "none", **engine_kwargs):
        self.engine = model if isinstance(model, Engine) else Engine(model, **engine_kwargs)
        self.tokenizer = self.engine.tokenizer
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.policy = policy
        self.kv_policy = kv_policy

    def _core(self) -> SchedulerCore:
        eng = self.engine
        cfg = SchedulerCoreConfig(policy=self.policy, max_batch_size=self.max_batch_size,
                                  max_tokens_per_batch=self.max_batch_tokens, block_size=eng.block_size,
                                  num_gpu_blocks=eng.num_gpu_blocks, num_host_blocks=0,
                                  max_model_len=eng.model_config.max_model_len)
        return SchedulerCore(cfg, CostModel.default(eng.block_size), make_kv_policy(self.kv_policy))

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[GenerationOutput]:
        eng = self.engine
        if isinstance(prompts, (str, int)) or (prompts and isinstance(prompts[0], int)):
            raise TypeError("prompts must be a list of strings or a list of token-id lists")
        params = params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        outs = []
        for p, sp in zip(prompts, plist):
            ids = self.tokenizer.encode(p).ids if isinstance(p, str) else list(p)
            eng.check_prompt(ids, sp.max_tokens)
            outs.append(GenerationOutput(p if isinstance(p, str) else None, ids))
        core = self._core()
        for i, (out, sp) in enumerate(zip(outs, plist)):
            try:
                core.add_job(JobSpec(str(i), 0.0, len(out.prompt_token_ids), sp.max_tokens), 0.0)
            except ValueError as exc:
                raise ValueError(f"prompt {i}: {exc}") from None
        bar = _progress(len(outs)) if use_tqdm else None
        eos = eng.model_config.eos_token_ids
        max_len = eng.model_config.max_model_len
        now = 0.0
        while core.num_jobs:
            d = core.schedule(now)
            work = []
            for e in d.batch:
                i = int(e.job_id)
                tokens = outs[i].prompt_token_ids + outs[i].token_ids
                work.append(SeqWork(e.job_id, tokens[e.num_computed:e.num_computed + e.num_new_tokens],
                                    e.num_computed, e.block_table, plist[i], num_generated=len(outs[i].token_ids),
                                    sample=e.sample))
            t0 = time.perf_counter()
            results = eng.step(work)
            elapsed = time.perf_counter() - t0
            now += elapsed
            finished = []
            for r in results:
                out, sp = outs[int(r.job_id)], plist[int(r.job_id)]
                out.token_ids.append(r.token_id)
                out.logprobs.append(r.logprob)
                if r.prompt_logprobs is not None:
                    out.prompt_logprobs = r.prompt_logprobs
                reason = sp.finish_reason(r.token_id, len(out.token_ids), eos)
                if reason is None and len(out.prompt_token_ids) + len(out.token_ids) >= max_len:
                    reason = "length"
                if reason:
                    out.finish_reason = reason
                    finished.append(r.job_id)
            core.update(IterationResult(d.iteration, elapsed, finished), now)
            eng.release(finished)
            if bar is not None:
                bar.update(len(finished))
        if bar is not None:
            bar.close()
        for out in outs:
            out.text = self.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        return outs


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="generate", unit="prompt")
