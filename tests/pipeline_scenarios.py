"""One deterministic serving scenario, driven the same way through a split
replica's PipelineLeader and through a single Engine (the reference).

Mixed prefill and decode, a chunked prefill, jobs in consecutive in-flight
batches (fed PENDING_TOKEN), jobs in every other batch (fed their token), and
one job offloaded, its blocks overwritten by another job's prefill, and
uploaded into other blocks between iterations. Module-level functions so
that spawned rank processes can import them.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from types import SimpleNamespace

from fastserve.common.sampling_params import SamplingParams
from fastserve.gpu_worker.batch import PENDING_TOKEN, SeqWork

# Top-5 logprobs too: a tiny model may loop on one token, its logprobs still differ.
GREEDY = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True, logprobs=5)
NUM_GPU_BLOCKS = 24
NUM_HOST_BLOCKS = 8
SWAP_HOST_BLOCKS = [5, 2]  # not in order, on purpose
BLOCKS = {"j0": [0, 1, 2, 3], "j1": [4, 5], "j2": [6, 7, 8, 9], "j3": [10, 11, 12, 13],
          "j4": [4, 5, 14, 15]}  # j4's prefill overwrites j1's blocks once j1 is offloaded
J1_AFTER_UPLOAD = [17, 16]
ITERATIONS = 12


def scenario_prompts(tokenizer) -> dict[str, list[int]]:
    enc = lambda text: tokenizer.encode(text).ids  # noqa: E731
    return {
        "j0": enc("Hello")[:1],  # a one-token prompt takes the decode path
        "j1": enc("The quick brown fox jumps over the lazy dog."),
        "j2": enc("Large language models generate one token at a time; every new token needs the keys and "
                  "values of all the tokens before it."),
        "j3": enc("def main():"),
        "j4": list(range(40, 80)),  # 40 tokens: fills j1's two blocks
    }


class EngineAsLeader:
    """A single Engine behind the leader's API: every future is done at once."""

    def __init__(self, engine):
        self.engine = engine
        self.last: dict[str, int] = {}

    def submit(self, work):
        work = [SeqWork(w.job_id, [self.last[w.job_id]], w.num_computed, w.block_table, w.sampling,
                        w.num_generated, w.sample) if w.token_ids == [PENDING_TOKEN] else w for w in work]
        results = self.engine.step(work)
        self.last.update({r.job_id: r.token_id for r in results})
        return _done(SimpleNamespace(results=results))

    def copy_out(self, gpu_blocks, host_blocks):
        self.engine.copy_out(gpu_blocks, host_blocks).wait()
        return _done(0.0)

    def copy_in(self, host_blocks, gpu_blocks):
        self.engine.copy_in(host_blocks, gpu_blocks).wait()
        return _done(0.0)

    def forget(self, job_ids):
        pass


def _done(value) -> Future:
    f = Future()
    f.set_result(value)
    return f


class Driver:
    """Keeps up to max_in_flight batches submitted; a job whose last sampled
    token is not collected yet is fed PENDING_TOKEN."""

    def __init__(self, leader, prompts: dict[str, list[int]], max_in_flight: int = 2):
        self.leader, self.prompts, self.max_in_flight = leader, prompts, max_in_flight
        self.blocks = {j: list(b) for j, b in BLOCKS.items()}
        self.tokens = {j: [] for j in prompts}
        self.logprobs = {j: [] for j in prompts}  # per token: [chosen, then the top 5]
        self.computed = {j: 0 for j in prompts}
        self.uncollected = {j: 0 for j in prompts}  # samples submitted, not collected
        self.in_flight: deque[Future] = deque()
        self.copies: list[Future] = []
        self.pending_fed = 0
        self.outputs = []

    def entry(self, job: str, chunk: int | None = None) -> SeqWork:
        prompt, done = self.prompts[job], self.computed[job]
        if done < len(prompt):
            end = len(prompt) if chunk is None else min(done + chunk, len(prompt))
            tokens, sample = prompt[done:end], end == len(prompt)
        elif self.uncollected[job]:
            tokens, sample = [PENDING_TOKEN], True
            self.pending_fed += 1
        else:
            tokens, sample = [self.tokens[job][-1]], True
        w = SeqWork(job, tokens, done, self.blocks[job], GREEDY,
                    num_generated=len(self.tokens[job]) + self.uncollected[job], sample=sample)
        self.computed[job] += len(tokens)
        self.uncollected[job] += sample
        return w

    def submit(self, jobs: list) -> None:
        while len(self.in_flight) >= self.max_in_flight:
            self.collect()
        work = [self.entry(*j) if isinstance(j, tuple) else self.entry(j) for j in jobs]
        self.in_flight.append(self.leader.submit(work))

    def collect(self) -> None:
        out = self.in_flight.popleft().result(timeout=120)
        self.outputs.append(out)
        for r in out.results:
            self.tokens[r.job_id].append(r.token_id)
            self.logprobs[r.job_id].append([r.logprob] + [lp for _, lp in r.top_logprobs])
            self.uncollected[r.job_id] -= 1

    def finish(self) -> None:
        while self.in_flight:
            self.collect()
        for f in self.copies:
            f.result(timeout=120)
        self.leader.forget(list(self.prompts))


def run_scenario(leader, prompts, max_in_flight: int = 2, swap: bool = True) -> Driver:
    d = Driver(leader, prompts, max_in_flight)
    every, alternate = ["j0", "j3"], ["j1", "j2"]
    d.submit(["j0", "j1"])
    d.submit(["j0", ("j2", 13), "j3"])  # j2's first chunk does not sample
    d.submit(["j0", "j1", "j2", "j3"])
    for it in range(3, 5):
        d.submit(every + (alternate if it % 2 == 0 else []))
    # j1 last ran in iteration 4: offload it, let j4's prefill overwrite its
    # blocks, upload it into other blocks; no waiting, the pipeline orders it.
    if swap:
        d.copies.append(d.leader.copy_out(d.blocks["j1"], SWAP_HOST_BLOCKS))
    d.submit(every + ["j4"])
    if swap:
        d.copies.append(d.leader.copy_in(SWAP_HOST_BLOCKS, J1_AFTER_UPLOAD))
        d.blocks["j1"] = list(J1_AFTER_UPLOAD)
    for it in range(6, ITERATIONS):
        d.submit(every + ["j4"] + (alternate if it % 2 == 0 else []))
    d.finish()
    return d


def scenario_rank(ctx, models: dict, pools: dict) -> dict:
    """Every rank: build its part of each model; the leader runs the
    scenario, the others serve. Returns the tokens (leader) and each rank's
    parameter count."""
    from fastserve.common.host_pool import HostKVPool, PoolSpec
    from fastserve.gpu_worker.launch import build_rank

    out = {}
    for name, path in models.items():
        pool = HostKVPool.attach(PoolSpec(*pools[name]))
        part = build_rank(path, ctx, num_gpu_blocks=NUM_GPU_BLOCKS, host_kv_buffer=pool.tensor,
                          num_host_blocks=NUM_HOST_BLOCKS)
        engine = part.engine
        row = {"params": sum(t.numel() for t in engine.model.tensors()), "layers": list(engine.shard.layers)}
        if ctx.rank == 0:
            d = run_scenario(part, scenario_prompts(engine.tokenizer))
            row.update(tokens=d.tokens, logprobs=d.logprobs, pending_fed=d.pending_fed,
                       stage_seconds=[o.stage_seconds for o in d.outputs], overlap=overlap_probe(part))
            part.close()
        else:
            part.serve()
        out[name] = row
        pool.close()
    return out


def vanishing_stage_rank(ctx, model: str) -> str:
    """Stage 1 leaves the group without serving: the leader's batch must fail
    (PipelineBroken), not hang, and the leader must refuse new work."""
    from fastserve.gpu_worker.launch import build_rank
    from fastserve.gpu_worker.leader import PipelineBroken

    part = build_rank(model, ctx, num_gpu_blocks=NUM_GPU_BLOCKS)
    if ctx.rank != 0:
        return "left"
    future = part.submit([SeqWork("a", [5, 6, 7], 0, [0], GREEDY)])
    try:
        future.result(timeout=ctx.timeout * 2)
    except PipelineBroken:
        pass
    else:
        return "completed without stage 1"
    try:
        part.submit([SeqWork("b", [5], 0, [1], GREEDY)])
    except PipelineBroken:
        part.close()
        return "refused"
    return "accepted after the failure"


def wire_rank(ctx, desc_sizes: list[int]) -> list:
    """Rank 0 sends items with descriptions of the given sizes through a
    Fanout (broadcast) and a Link (with hidden rows); rank 1 returns what arrived."""
    import torch

    from fastserve.gpu_worker.stage_wire import Fanout, Item, Kind, Link

    fanout = Fanout(ctx.tp_group, 0, num_stages=2)
    link = Link(ctx.tp_group, 1 - ctx.rank, num_stages=2, stage=1, hidden_size=4, dtype=torch.float32)
    got = []
    for i, size in enumerate(desc_sizes):
        desc = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        hidden = torch.arange(12, dtype=torch.float32).view(3, 4) + i
        if ctx.rank == 0:
            fanout.send(Item(Kind.BATCH, i, desc, timings=[1, 2, 3, 4]))
            link.send(Item(Kind.BATCH, i, desc, hidden, [5, 6, 7, 8]))
        else:
            a, b = fanout.recv(), link.recv()
            got.append([a.seq, a.desc == desc, a.timings, b.seq, b.desc == desc, torch.equal(b.hidden, hidden),
                        b.timings[:3], b.timings[3] > 0])
    link.flush()
    return got


def overlap_probe(leader) -> bool:
    """Two batches of different jobs submitted back to back: did stage 0
    begin the second before the first one's results were back?"""
    first = leader.submit([SeqWork("p", list(range(5, 60)), 0, [0, 1, 2, 3], GREEDY)])
    second = leader.submit([SeqWork("q", list(range(7, 62)), 0, [4, 5, 6, 7], GREEDY)])
    a, b = first.result(timeout=120), second.result(timeout=120)
    return b.started_at < a.finished_at
