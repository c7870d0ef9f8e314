"""Cost of vLLM's sampling parameters on the engine's decode throughput, each
beside its baseline measured in the same run: three batches (plain, penalties,
structured) decode taking turns step by step, and a cost is the median over
steps of the step-time ratio to the plain batch's neighbouring step:

- penalties: presence, frequency and repetition penalties plus a 16-entry
  logit_bias on every sequence, vs the same sampling without them (target:
  at most 10% slower at batch 32 on the `small` model);
- structured output: every sequence constrained by a JSON-schema grammar
  (llguidance masks computed beside the forward pass), vs unconstrained; shown
  with the library's own published figure (~50 us of CPU time per token for a
  128k-token vocabulary) and the mask time measured here.

    python benchmarks/bench_sampling.py [--model DIR] [--batch 32] [--steps 48] [--out FILE]

Without --model a random-weight `small` llama is made in a temporary folder.
Prints one JSON object."""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

SCHEMA = {"type": "object", "properties": {"values": {"type": "array", "items": {"type": "integer"}}},
          "required": ["values"]}


class Lane:
    """One batch of sequences decoding with its own sampling parameters."""

    def __init__(self, engine, name: str, prompts, params, first_block: int, per_seq: int):
        from fastserve.gpu_worker.batch import SeqWork

        self.engine, self.prompts, self.params = engine, prompts, params
        self.ids = [f"{name}-{i}" for i in range(len(prompts))]
        self.tables = [list(range(first_block + i * per_seq, first_block + (i + 1) * per_seq))
                       for i in range(len(prompts))]
        results = engine.step([SeqWork(self.ids[i], p, 0, self.tables[i], params[i]) for i, p in enumerate(prompts)])
        self.last = [r.token_id for r in results]
        self.generated = 1

    def step(self) -> float:
        """One decode step of the whole batch (finished sequences keep decoding:
        the batch stays full); its seconds."""
        from fastserve.gpu_worker.batch import SeqWork

        n = self.generated
        work = [SeqWork(self.ids[i], [self.last[i]], len(p) + n - 1, self.tables[i], self.params[i], num_generated=n)
                for i, p in enumerate(self.prompts)]
        t0 = time.perf_counter()
        self.last = [r.token_id for r in self.engine.step(work)]
        self.generated += 1
        return time.perf_counter() - t0


def mask_microseconds(engine, grammar: str, tokens: int = 200) -> float:
    """llguidance's time per token for one sequence of this grammar, outside the engine."""
    import torch

    g = engine.grammars
    m = g.matcher(grammar)
    mask = torch.zeros((1, g.words), dtype=torch.int32)
    gen = torch.Generator().manual_seed(0)
    spent, n = 0.0, 0
    for _ in range(tokens):
        t0 = time.perf_counter()
        g.executor.unsafe_compute_mask_ptr([(m, 0)], mask.data_ptr(), g.words * 4, 1)
        spent += time.perf_counter() - t0
        n += 1
        bits = ((mask[0][:, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[:g.vocab_size]
        allowed = bits.nonzero().flatten()
        if m.is_stopped() or len(allowed) == 0:
            break
        m.consume_token(int(allowed[torch.randint(len(allowed), (), generator=gen)]))
    return 1e6 * spent / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import llguidance
    import torch

    from fastserve.common.sampling_params import SamplingParams
    from fastserve.gpu_worker.engine import Engine

    model = args.model
    if model is None:
        from fastserve.gpu_worker.model_maker import make_model

        model = str(make_model(tempfile.mkdtemp(prefix="bench-sampling-"), preset="small"))
    blocks_per_seq = -(-(args.prompt_len + args.steps + 2) // 16)
    engine = Engine(model, device=args.device, num_gpu_blocks=3 * args.batch * blocks_per_seq)
    vocab = engine.model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.batch)]
    bias = tuple((int(t), 2.0) for t in torch.randperm(vocab, generator=g)[:16].tolist())
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA),
                                                            defaults={"whitespace_flexible": False})

    def params(i: int, **kw) -> SamplingParams:
        return SamplingParams(temperature=0.8, seed=i, max_tokens=args.steps + 1, ignore_eos=True, **kw)

    variants = {
        "plain": [params(i) for i in range(args.batch)],
        "penalties": [params(i, presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.1,
                             logit_bias=bias) for i in range(args.batch)],
        "structured": [params(i, grammar=grammar) for i in range(args.batch)],
    }
    lanes = {name: Lane(engine, name, prompts, p, k * args.batch * blocks_per_seq, blocks_per_seq)
             for k, (name, p) in enumerate(variants.items())}
    # The lanes take turns step by step, so load on a shared machine hits all
    # of them alike; each round's ratio to the plain lane is one sample.
    times: dict[str, list[float]] = {k: [] for k in lanes}
    for _ in range(args.steps):
        for name, lane in lanes.items():
            times[name].append(lane.step())
    tps = {k: args.batch / statistics.median(v) for k, v in times.items()}
    ratio = {k: statistics.median(t / b for t, b in zip(times[k], times["plain"])) for k in ("penalties", "structured")}
    report = {
        "model": model, "device": args.device, "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(), "batch": args.batch, "prompt_len": args.prompt_len,
        "decode_steps": args.steps, "vocab_size": vocab,
        "decode_tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "step_ms_median": {k: round(1e3 * statistics.median(v), 2) for k, v in times.items()},
        "step_ms_min": {k: round(1e3 * min(v), 2) for k, v in times.items()},
        "penalties_cost": round(ratio["penalties"] - 1, 4),
        "penalties_target_met": ratio["penalties"] <= 1 / 0.9,
        "structured_cost": round(ratio["structured"] - 1, 4),
        "llguidance": {"version": llguidance.__dict__.get("__version__") or _version("llguidance"),
                       "mask_us_per_token_here": round(mask_microseconds(engine, grammar), 1),
                       "published_us_per_token": 50,
                       "published_for": "128k-token vocabulary (llguidance README: 'on the order of 50us of CPU "
                                        "time per token')"},
    }
    text = json.dumps(report, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    main()
