"""vLLM's sampling parameters on the engine, each with a known answer:
penalties, logit_bias, min_tokens, min_p, allowed_token_ids, bad_words, tiny
temperatures, prompt logprobs."""
import pytest
import torch

from fastserve.common.sampling_params import SamplingParams
from fastserve.gpu_worker.batch import SeqWork
from fastserve.gpu_worker.engine import Engine
from fastserve.gpu_worker.job_state import JobState
from fastserve.llm import LLM
from fastserve.gpu_worker.sampling import SampleRow, Sampler, sample

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir, num_gpu_blocks=128)


def greedy(llm, n=12, **kw):
    return llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw))[0]


def _state(params, prompt, output):
    st = JobState(params, tokens=list(prompt) + list(output), prompt_len=len(prompt))
    return SampleRow(params, len(output), st)


def test_penalties_change_exactly_the_logits_they_should():
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5, 3.0, -2.0, 0.0, 4.0]])
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)
    row = _state(p, prompt=[1, 2], output=[2, 3, 3])
    out = Sampler(8, (), "cpu").process(logits.clone(), [row])[0]
    # token 1: prompt only -> repetition: 2.0 / 2
    # token 2: prompt and output once -> -1.0 * 2 - 0.25 * 1 - 0.5
    # token 3: output twice -> 0.5 / 2 - 0.25 * 2 - 0.5
    expected = torch.tensor([1.0, 1.0, -2.75, -0.75, 3.0, -2.0, 0.0, 4.0])
    torch.testing.assert_close(out, expected)


def test_penalty_counts_follow_the_generated_tokens(llm, tiny_model_dir):
    """Greedy decoding with penalties equals the same decoding done by hand,
    one full forward per token, with vLLM's order: logit_bias (which makes the
    random model repeat a token), then repetition, frequency and presence."""
    params = dict(presence_penalty=0.7, frequency_penalty=2.0, repetition_penalty=1.6, logit_bias=((77, 20.0),))
    got = greedy(llm, n=10, **params).token_ids
    engine = llm.engine
    prompt = engine.tokenizer.encode(PROMPT).ids
    tokens, out = list(prompt), []
    for _ in range(10):
        x = engine.forward([SeqWork("by-hand", tokens, 0, list(range(8)))])[0].clone()
        x[77] += 20.0
        for t in set(tokens):
            x[t] = x[t] / 1.6 if x[t] > 0 else x[t] * 1.6
        for t in set(out):
            x[t] -= 2.0 * out.count(t) + 0.7
        out.append(int(x.argmax()))
        tokens.append(out[-1])
    assert got == out
    only_bias = greedy(llm, n=10, logit_bias=((77, 20.0),)).token_ids
    assert only_bias == [77] * 10 and 1 <= got.count(77) < 10  # the penalties pushed back


def test_logit_bias_plus_100_forces_a_token(llm):
    forced = 77
    out = llm.generate([PROMPT], SamplingParams(temperature=1.0, seed=3, max_tokens=6, ignore_eos=True,
                                                logit_bias=((forced, 100.0),)))[0]
    assert out.token_ids == [forced] * 6
    free = greedy(llm, n=6).token_ids
    banned = greedy(llm, n=6, logit_bias=((free[0], -100.0),)).token_ids
    assert banned[0] != free[0]


def test_min_tokens_suppresses_eos_and_stop_tokens(llm):
    free = greedy(llm, n=12).token_ids
    stop = free[3]
    first = free.index(stop)
    stopped = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=(stop,)))[0]
    assert len(stopped.token_ids) == first + 1 and stopped.finish_reason == "stop"
    held = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=(stop,),
                                                 min_tokens=10))[0]
    assert len(held.token_ids) >= 10 and stop not in held.token_ids[:10]
    eos = llm.engine.model_config.eos_token_ids[0]
    to_eos = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=8, logit_bias=((eos, 100.0),),
                                                   min_tokens=5))[0]
    assert to_eos.token_ids[:5] != [eos] * 5 and eos not in to_eos.token_ids[:5]
    assert to_eos.token_ids[5] == eos and to_eos.finish_reason == "stop" and len(to_eos.token_ids) == 6


def test_min_p_drops_unlikely_tokens():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    p = [SamplingParams(temperature=1.0, min_p=0.2)]  # floor 0.1: token 3 (0.05) is cut
    for _ in range(3000):
        tok, _, _ = sample(logits.clone(), p, [0], g)
        counts[tok[0]] += 1
    assert counts[3] == 0
    torch.testing.assert_close(counts[:3] / counts.sum(), torch.tensor([0.5, 0.3, 0.15]) / 0.95, atol=0.03, rtol=0)


def test_allowed_token_ids_and_bad_words(llm):
    out = llm.generate([PROMPT], SamplingParams(temperature=1.0, seed=1, max_tokens=10, ignore_eos=True,
                                                allowed_token_ids=(5, 9, 300)))[0]
    assert set(out.token_ids) <= {5, 9, 300}
    free = greedy(llm, n=6).token_ids
    one = greedy(llm, n=6, bad_words=((free[0],),)).token_ids
    assert free[0] not in one
    two = greedy(llm, n=6, bad_words=((free[1], free[2]),)).token_ids
    assert two[:2] == free[:2] and two[2] != free[2]


def test_tiny_temperatures_are_greedy(llm):
    want = greedy(llm).token_ids
    for t in (1e-40, 1e-6):
        got = llm.generate([PROMPT], SamplingParams(temperature=t, seed=5, max_tokens=12, ignore_eos=True))[0]
        assert got.token_ids == want


def test_prompt_logprobs_are_the_prefill_logprobs(tiny_model_dir):
    engine = Engine(tiny_model_dir, num_gpu_blocks=16)
    ids = engine.tokenizer.encode("Hello world, how are you today?").ids
    logp = engine.forward([SeqWork("ref", ids, 0, list(range(8)))], all_logits=True).log_softmax(-1)
    want = [float(logp[j, ids[j + 1]]) for j in range(len(ids) - 1)]
    p = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=2)
    # The prompt in two chunks: the first chunk's last row predicts the second chunk's first token.
    half = len(ids) // 2
    assert engine.step([SeqWork("a", ids[:half], 0, [8, 9, 10], p, sample=False)]) == []
    (r,) = engine.step([SeqWork("a", ids[half:], half, [8, 9, 10], p)])
    assert [lp for lp, _, _ in r.prompt_logprobs] == pytest.approx(want, abs=1e-5)
    for j, (lp, rank, top) in enumerate(r.prompt_logprobs):
        assert rank == int((logp[j] > logp[j, ids[j + 1]]).sum()) + 1
        assert [t for t, _ in top] == logp[j].topk(2).indices.tolist()
    (r2,) = engine.step([SeqWork("a", [r.token_id], len(ids), [8, 9, 10], p, num_generated=1)])
    assert r2.prompt_logprobs is None  # sent once, with the first token


def test_states_are_released(tiny_model_dir):
    engine = Engine(tiny_model_dir, num_gpu_blocks=16)
    p = SamplingParams(temperature=0.0, frequency_penalty=1.0)
    engine.step([SeqWork("a", [5, 6, 7], 0, [0], p)])
    assert len(engine.states) == 1 and engine.sampler.penalties.counts.shape[0] > 0
    engine.release(["a"])
    engine.step([SeqWork("b", [5, 6], 0, [1])])
    assert len(engine.states) == 0
    pool = engine.sampler.penalties
    assert pool._free and not pool.counts.any() and not pool.seen.any()


@pytest.mark.parametrize("kwargs", [dict(presence_penalty=2.5), dict(frequency_penalty=-3), dict(repetition_penalty=0),
                                    dict(min_p=1.5), dict(min_tokens=20, max_tokens=5), dict(seed=2**64),
                                    dict(logit_bias=((1, 101.0),)), dict(logit_bias=((1, 1.0), (1, 2.0))),
                                    dict(allowed_token_ids=()), dict(bad_words=((),)), dict(prompt_logprobs=-1),
                                    dict(grammar="")])
def test_bad_new_params(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_params_round_trip_through_a_dict():
    p = SamplingParams(logit_bias=((3, 1.5),), allowed_token_ids=(1, 2), bad_words=((4, 5), (6,)), min_tokens=2,
                       seed=2**64 - 1, grammar='start: "a"', prompt_logprobs=0)
    assert SamplingParams.from_dict(p.to_dict()) == p
