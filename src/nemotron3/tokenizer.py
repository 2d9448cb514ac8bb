"""Tokenizers: a byte-level one (no download, ids 0..255 are the UTF-8 bytes) and a Hugging Face `tokenizer.json`
found beside a checkpoint (through the `tokenizers` library, imported only when needed), with the chat template of
its tokenizer_config.json."""

from __future__ import annotations

import json
import os


class ByteTokenizer:
    """ids 0..255 are the UTF-8 bytes; 0 (NUL, absent from text) doubles as the end-of-document token."""
    vocab_size = 256
    eos_token_id = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if 0 < i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            enable_thinking: bool = True, **kwargs) -> str:
        """The built-in corpus's format (what the demo model learned): "Q: ...\n<think>...</think>\nA: ...\n".
        System messages are prepended as plain lines; earlier answers keep no reasoning (as Nemotron 3's template
        drops earlier turns' thinking). enable_thinking=False prefills an empty thought."""
        out = []
        for m in messages:
            role, content = m.get("role"), m.get("content", "")
            if role == "system":
                out.append(f"{content}\n")
            elif role == "user":
                out.append(f"Q: {content}\n")
            elif role == "assistant":
                out.append(f"<think></think>\nA: {content}\n")
            else:
                raise ValueError(f"unknown chat role {role!r}: use system, user or assistant.")
        if add_generation_prompt:
            out.append("<think>" if enable_thinking else "<think></think>\nA: ")
        return "".join(out)


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (through the `tokenizers` library), with the special tokens and the Jinja
    chat template of the `tokenizer_config.json` beside it (rendered as transformers renders it: a sandboxed Jinja
    environment with trim_blocks / lstrip_blocks and a raise_exception helper)."""

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError(f"{path} needs the `tokenizers` package: pip install tokenizers") from None
        self.tok = Tokenizer.from_file(path)
        self.vocab_size = self.tok.get_vocab_size()
        self.config = {}
        cfg_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                self.config = json.load(f)
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token_id = self.tok.token_to_id(self.eos_token) if self.eos_token else None
        self.chat_template = self.config.get("chat_template")

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text for `messages`; kwargs reach the template (Nemotron 3: enable_thinking=True/False)."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat_template in tokenizer_config.json; format the prompt "
                             "yourself or add a template.")
        try:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise ImportError("chat templates need jinja2: pip install jinja2") from None

        def raise_exception(message):
            raise TemplateError(message)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
            eos_token=self.eos_token or "", **kwargs)


def _token_text(tok):
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} objects."""
    return tok.get("content") if isinstance(tok, dict) else tok


def load_tokenizer(model_dir: str | None, vocab_size: int):
    """tokenizer.json beside the weights if there is one, else bytes (which needs vocab_size >= 256)."""
    if model_dir and os.path.exists(os.path.join(model_dir, "tokenizer.json")):
        return HFTokenizer(os.path.join(model_dir, "tokenizer.json"))
    if vocab_size < 256:
        raise ValueError(f"this model has vocab_size={vocab_size} and no tokenizer.json; text needs >= 256 ids for "
                         f"the byte tokenizer. Pass --prompt-ids instead.")
    return ByteTokenizer()
