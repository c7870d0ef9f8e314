"""Tokenizer helpers: loading tokenizer.json, chat templates (jinja2, from
tokenizer_config.json), and incremental detokenization for streaming."""
from __future__ import annotations

import json
from pathlib import Path


def load_tokenizer(model_dir: str | Path):
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the engine needs a `tokenizers` tokenizer.json")
    return Tokenizer.from_file(str(path))


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised as a dict
        return value.get("content")
    return value


class ChatTemplate:
    """A Hugging Face chat template rendered with a sandboxed jinja2."""

    def __init__(self, template: str, bos_token: str | None = None, eos_token: str | None = None):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(f"chat template error: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, indent=indent, ensure_ascii=False)
        self.source = template
        self.template = env.from_string(template)
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "ChatTemplate":
        path = Path(model_dir) / "tokenizer_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: no chat template for this model")
        cfg = json.loads(path.read_text())
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if not template:
            jinja = Path(model_dir) / "chat_template.jinja"
            if jinja.is_file():
                template = jinja.read_text()
        if not template:
            raise ValueError(f"{path} has no chat_template")
        return cls(template, _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token")))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"a chat message needs 'role' and 'content', got {m!r}")
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token, eos_token=self.eos_token, **kwargs)


def apply_chat_template(model_dir_or_template, messages: list[dict], add_generation_prompt: bool = True,
                        **kwargs) -> str:
    tmpl = model_dir_or_template
    if not isinstance(tmpl, ChatTemplate):
        tmpl = ChatTemplate.from_model_dir(tmpl)
    return tmpl.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas that never end in half a
    UTF-8 character: text whose decoding ends in U+FFFD is held back until the
    rest of the character arrives (or `flush()` at the end).

    Only a window (the last emitted tokens and the unread ones) is decoded, so
    each call costs O(window), not O(text)."""

    _CONTEXT = 5  # prompt tokens of context for the first delta

    def __init__(self, tokenizer, prompt_token_ids: list[int] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_token_ids or [])
        self.read_offset = len(self.ids)  # ids before this are already emitted
        self.prefix_offset = max(0, self.read_offset - self._CONTEXT)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_ids) -> str:
        """Feed new token ids; returns the newly complete text (maybe "")."""
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        self.ids.extend(token_ids)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix):]
        # The tokens just emitted become the next window's context (as vLLM does).
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of a stream: whatever is left, replacement chars included."""
        rest = self._decode(self.ids[self.prefix_offset:])
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        delta = rest[len(prefix):]
        self.read_offset = len(self.ids)
        self.text += delta
        return delta
