"""Greedy outputs and logits of the engine against Hugging Face transformers
on the same random-weight checkpoints (float32)."""
import functools

import pytest
import torch

from fastserve.gpu_worker.batch import SeqWork
from fastserve.gpu_worker.engine import Engine
from fastserve.llm import LLM
from fastserve.common.sampling_params import SamplingParams

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "Large language models generate one token at a time; every new token needs the keys and values of all the "
    "tokens before it, kept in a cache.",
    "def main():",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12)

FAMILIES = {
    "llama-gqa": ("llama", {}),
    "llama-mha": ("llama", {"num_key_value_heads": 4}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama3-rope": ("llama", {"rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}}),
    "llama-attn-bias": ("llama", {"attention_bias": True}),
    "mistral": ("mistral", {}),
    "qwen2-bias-tied": ("qwen2", {}),
}


@functools.lru_cache(maxsize=None)
def hf_model(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def hf_greedy(path, prompt_ids, max_new_tokens):
    """transformers' greedy generate, one prompt at a time (no padding), stopping at EOS."""
    model = hf_model(str(path))
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=1)
    return out[0, len(prompt_ids):].tolist()


def hf_logits(path, ids):
    with torch.no_grad():
        return hf_model(str(path))(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers(make_tiny_model, family):
    arch, overrides = FAMILIES[family]
    path = make_tiny_model(arch, **overrides)
    llm = LLM(path, num_gpu_blocks=64)
    one_token = [llm.tokenizer.encode("Hello").ids[0]]  # a 1-token prompt goes down the decode path
    outs = llm.generate(PROMPTS + [one_token], GREEDY)  # all prompts in one batch
    for out in outs:
        expected = hf_greedy(path, out.prompt_token_ids, GREEDY.max_tokens)
        assert out.token_ids == expected, out.prompt
    # The test must be able to see a difference: outputs are not all alike.
    assert len({tuple(o.token_ids) for o in outs}) > 1


def test_bias_and_rope_variants_change_outputs(make_tiny_model):
    """The family variants are really different models (else matching them proves little)."""
    ids = list(range(10, 30))
    base = hf_logits(make_tiny_model("llama"), ids)
    for name in ("llama3-rope", "llama-tied"):
        arch, overrides = FAMILIES[name]
        assert not torch.allclose(base, hf_logits(make_tiny_model(arch, **overrides), ids), atol=1e-3), name


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2-bias-tied", "llama3-rope"])
def test_logits_match_transformers(make_tiny_model, family):
    arch, overrides = FAMILIES[family]
    path = make_tiny_model(arch, **overrides)
    engine = Engine(path, num_gpu_blocks=16)
    ids = engine.tokenizer.encode(PROMPTS[2]).ids
    assert len(ids) > 2 * engine.block_size
    ours = engine.forward([SeqWork("a", ids, 0, [0, 1, 2, 3])], all_logits=True)
    ref = hf_logits(path, ids)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)

    # Chunked prefill (the second chunk attends to the cached first one)
    # and a batch of several jobs give the same logits.
    split = 13
    engine.forward([SeqWork("b", ids[:split], 0, [4, 5, 6, 7], sample=False)])
    chunk = engine.forward([SeqWork("x", [3, 4], 0, [8]), SeqWork("b", ids[split:], split, [4, 5, 6, 7])],
                           all_logits=True)
    torch.testing.assert_close(chunk[2:], ref[split:], atol=1e-4, rtol=1e-4)


def test_jobs_joining_a_running_batch(make_tiny_model):
    """Continuous batching: jobs start at different iterations and run beside
    decodes of others; each job's tokens equal transformers' alone."""
    path = make_tiny_model("llama")
    engine = Engine(path, num_gpu_blocks=64)
    prompts = [engine.tokenizer.encode(p).ids for p in PROMPTS]
    joins = {0: 0, 1: 2, 2: 3, 3: 7}  # job -> iteration it arrives
    n = 10
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    tokens = {j: [] for j in joins}
    blocks = {j: list(range(8 * j, 8 * j + 8)) for j in joins}
    it = 0
    while any(len(t) < n for t in tokens.values()):
        work = []
        for j, start in joins.items():
            if it < start or len(tokens[j]) >= n:
                continue
            if not tokens[j]:
                work.append(SeqWork(str(j), prompts[j], 0, blocks[j], params))
            else:
                done = len(prompts[j]) + len(tokens[j]) - 1
                work.append(SeqWork(str(j), [tokens[j][-1]], done, blocks[j], params, num_generated=len(tokens[j])))
        for r in engine.step(work):
            tokens[int(r.job_id)].append(r.token_id)
        it += 1
    hf = hf_model(str(path))
    for j, ids in enumerate(prompts):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              eos_token_id=None, pad_token_id=1)[0, len(ids):].tolist()
        if 1 in ref or 3 in ref:
            pytest.fail("EOS suppression changed transformers' argmax; pick other prompts")
        assert tokens[j] == ref, j


def test_llm_continuous_batching_small_batch(make_tiny_model):
    """With max_batch_size=2 later prompts join as earlier ones finish."""
    path = make_tiny_model("mistral")
    llm = LLM(path, max_batch_size=2, num_gpu_blocks=64)
    params = [SamplingParams(temperature=0.0, max_tokens=m) for m in (3, 9, 5, 7)]
    outs = llm.generate(PROMPTS, params)
    for out, p in zip(outs, params):
        assert out.token_ids == hf_greedy(path, out.prompt_token_ids, p.max_tokens)
        assert out.finish_reason in ("stop", "length")
