"""Offline generation: `LLM(model_dir).generate(prompts, params)`, continuous
batching over the engine with its own block allocator (first come, first
served; a job waits until blocks for its whole prompt + max_tokens are free,
so nothing is ever preempted)."""
from __future__ import annotations

from dataclasses import dataclass, field

from fastserve.gpu_worker.batch import SeqWork
from fastserve.gpu_worker.engine import Engine
from fastserve.common.sampling_params import SamplingParams


class BlockAllocator:
    def __init__(self, num_blocks: int):
        self.free = list(range(num_blocks - 1, -1, -1))

    def can_allocate(self, n: int) -> bool:
        return n <= len(self.free)

    def allocate(self, n: int) -> list[int]:
        assert self.can_allocate(n), (n, len(self.free))
        return [self.free.pop() for _ in range(n)]

    def deallocate(self, blocks: list[int]) -> None:
        self.free.extend(reversed(blocks))


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


@dataclass
class _Job:
    index: int
    out: GenerationOutput
    params: SamplingParams
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0


class LLM:
    def __init__(self, model, max_batch_size: int = 32, max_batch_tokens: int = 4096, **engine_kwargs):
        self.engine = model if isinstance(model, Engine) else Engine(model, **engine_kwargs)
        self.tokenizer = self.engine.tokenizer
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[GenerationOutput]:
        eng = self.engine
        if isinstance(prompts, (str, int)) or (prompts and isinstance(prompts[0], int)):
            raise TypeError("prompts must be a list of strings or a list of token-id lists")
        params = params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        jobs = []
        for i, (p, sp) in enumerate(zip(prompts, plist)):
            ids = self.tokenizer.encode(p).ids if isinstance(p, str) else list(p)
            eng.check_prompt(ids, sp.max_tokens)
            jobs.append(_Job(i, GenerationOutput(p if isinstance(p, str) else None, ids), sp))
        bs = eng.block_size
        alloc = BlockAllocator(eng.num_gpu_blocks)
        for j in jobs:
            need = -(-(len(j.out.prompt_token_ids) + j.params.max_tokens) // bs)
            if need > eng.num_gpu_blocks:
                raise ValueError(f"prompt {j.index} needs {need} KV blocks; the engine has {eng.num_gpu_blocks}")
        waiting, running = list(jobs), []
        eos = eng.model_config.eos_token_ids
        while waiting or running:
            budget = self.max_batch_tokens - len(running)
            while waiting and len(running) < self.max_batch_size:
                j = waiting[0]
                n_prompt = len(j.out.prompt_token_ids)
                need = -(-(n_prompt + j.params.max_tokens) // bs)
                if not alloc.can_allocate(need) or (n_prompt > budget and running):
                    break
                j.blocks = alloc.allocate(need)
                budget -= n_prompt
                running.append(waiting.pop(0))
            work = []
            for j in running:
                if j.num_computed == 0:
                    new = j.out.prompt_token_ids
                else:
                    new = [j.out.token_ids[-1]]
                work.append(SeqWork(str(j.index), new, j.num_computed, j.blocks, j.params,
                                    num_generated=len(j.out.token_ids)))
            results = eng.step(work)
            still = []
            for j, w, r in zip(running, work, results):
                j.num_computed += len(w.token_ids)
                j.out.token_ids.append(r.token_id)
                j.out.logprobs.append(r.logprob)
                if r.prompt_logprobs is not None:
                    j.out.prompt_logprobs = r.prompt_logprobs
                reason = j.params.finish_reason(r.token_id, len(j.out.token_ids), eos)
                if reason:
                    j.out.finish_reason = reason
                    alloc.deallocate(j.blocks)
                    eng.release([w.job_id])
                else:
                    still.append(j)
            running = still
        for j in jobs:
            j.out.text = self.tokenizer.decode(j.out.token_ids, skip_special_tokens=True)
        return [j.out for j in jobs]
