"""Sampling: seeded reproducibility independent of batching, top-k/top-p,
stop ids and EOS, logprobs."""
import pytest
import torch

from fastserve.gpu_worker.batch import SeqWork
from fastserve.gpu_worker.engine import Engine
from fastserve.llm import LLM
from fastserve.common.sampling_params import SamplingParams
from fastserve.gpu_worker.sampling import sample


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir, num_gpu_blocks=64)


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    p = SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    alone = llm.generate(["Hello"], p)[0].token_ids
    others = [SamplingParams(temperature=1.0, seed=s, max_tokens=m, ignore_eos=True) for s, m in ((1, 5), (2, 20))]
    batched = llm.generate(["The quick brown fox", "Hello", "def main():"], [others[0], p, others[1]])
    assert batched[1].token_ids == alone
    other_seed = llm.generate(["Hello"], SamplingParams(temperature=1.0, seed=8, max_tokens=12, ignore_eos=True))
    assert other_seed[0].token_ids != alone


def test_top_k_one_and_tiny_top_p_are_greedy(llm):
    greedy = llm.generate(["Hello world"], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0]
    for p in (SamplingParams(temperature=1.5, top_k=1, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=1.5, top_p=1e-6, seed=3, max_tokens=8, ignore_eos=True)):
        assert llm.generate(["Hello world"], p)[0].token_ids == greedy.token_ids


def test_sampler_follows_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    counts = torch.zeros(5)
    p = [SamplingParams(temperature=1.0, top_k=3, top_p=0.9)]
    g = torch.Generator().manual_seed(0)
    for _ in range(3000):
        tok, _, _ = sample(logits.clone(), p, [0], g)
        counts[tok[0]] += 1
    freq = counts / counts.sum()
    probs = logits[0, :3].softmax(-1)  # top-k 3; mass of the first two is 0.86 < 0.9, so the third stays
    assert counts[3:].sum() == 0
    torch.testing.assert_close(freq[:3], probs, atol=0.03, rtol=0)


def test_stop_token_and_eos_end_generation(llm, tiny_model_dir):
    free = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))[0]
    stop = free.token_ids[3]
    first = free.token_ids.index(stop)
    out = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=(stop,)))[0]
    assert out.token_ids == free.token_ids[:first + 1] and out.finish_reason == "stop"
    length = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))[0]
    assert len(length.token_ids) == 4 and length.finish_reason == "length"
    p = SamplingParams(max_tokens=5)
    assert p.finish_reason(1, 1, (1, 3)) == "stop"
    assert SamplingParams(max_tokens=5, ignore_eos=True).finish_reason(1, 1, (1, 3)) is None
    assert p.finish_reason(9, 5, (1, 3)) == "length"


def test_logprobs_are_the_models(tiny_model_dir):
    engine = Engine(tiny_model_dir, num_gpu_blocks=8)
    ids = engine.tokenizer.encode("Hello world").ids
    logits = engine.forward([SeqWork("a", ids, 0, [0])])[0]
    r = engine.step([SeqWork("a", ids, 0, [1], SamplingParams(temperature=0.0, logprobs=3))])[0]
    logp = logits.log_softmax(-1)
    assert r.token_id == int(logits.argmax())
    assert r.logprob == pytest.approx(float(logp[r.token_id]), abs=1e-5)
    assert [t for t, _ in r.top_logprobs] == logp.topk(3).indices.tolist()
    assert r.top_logprobs[0][1] >= r.top_logprobs[1][1] >= r.top_logprobs[2][1]


@pytest.mark.parametrize("kwargs", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5),
                                    dict(top_k=0), dict(logprobs=-1), dict(seed="x"),
                                    dict(max_tokens=True), dict(temperature=float("nan"))])
def test_bad_sampling_params(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_llm_rejects_bad_prompts(llm):
    with pytest.raises(ValueError, match="empty prompt"):
        llm.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="context length 512"):
        llm.generate([[5] * 510], SamplingParams(max_tokens=8))
    with pytest.raises(ValueError, match="empty prompt"):
        llm.generate([""], SamplingParams())
