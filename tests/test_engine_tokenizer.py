"""Chat template rendering and incremental detokenization."""
from fastserve.common.tokenizer import ChatTemplate, IncrementalDetokenizer, apply_chat_template, load_tokenizer


def test_chat_template_renders_chatml(tiny_model_dir):
    text = apply_chat_template(tiny_model_dir, [{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "Hi!"}])
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    tmpl = ChatTemplate.from_model_dir(tiny_model_dir)
    assert not tmpl.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=False).endswith(
        "assistant\n")
    ids = load_tokenizer(tiny_model_dir).encode(text).ids
    assert ids[0] == 2  # <|im_start|> is one special token


def test_incremental_detokenizer_never_splits_a_character(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    text = "Émile a mangé 東京 🙂 crème brûlée, ünïcödé!"
    ids = tok.encode(text).ids
    assert len(ids) > len(text) // 2  # byte-level pieces: some characters span several tokens
    prompt = tok.encode("Say: ").ids
    detok = IncrementalDetokenizer(tok, prompt_token_ids=prompt)
    deltas = [detok.add(t) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # some token ended mid-character and was held back
    assert "".join(deltas) + detok.flush() == text == detok.text
