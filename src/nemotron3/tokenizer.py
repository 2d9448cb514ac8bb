"""Tokenizers: a byte-level one (no download, ids 0..255 are the UTF-8 bytes) and a Hugging Face `tokenizer.json`
found beside a checkpoint (through the `tokenizers` library, imported only when needed), with the chat template of
its tokenizer_config.json."""

from __future__ import annotations

import json
import os

from .chat_format import END_OF_TURN, normalize_messages, render_chat


class ByteTokenizer:
    """ids 0..255 are the UTF-8 bytes; 0 (NUL, absent from text) doubles as the end-of-document token."""
    vocab_size = 256
    eos_token_id = 0
    end_of_turn = END_OF_TURN
    """The chat template's end of an assistant turn: text here (no special ids), so generation stops on it as a
    stop string; tokenizers with a special end-of-turn token stop on its id (eos) and have None."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """The text of ids; eos (0) is never text, whatever skip_special_tokens (there is no other special id)."""
        return bytes(i for i in ids if 0 < i < 256).decode("utf-8", errors="replace")

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """ids and, for each, the index of the character it belongs to (a character is 1-4 bytes)."""
        if text.isascii():
            return list(text.encode("ascii")), list(range(len(text)))
        ids, starts = [], []
        for i, ch in enumerate(text):
            b = ch.encode("utf-8")
            ids += b
            starts += [i] * len(b)
        return ids, starts

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            enable_thinking: bool = True, tools: list[dict] | None = None,
                            truncate_history_thinking: bool = True, **kwargs) -> str:
        """Nemotron 3's chat format (chat_format.py: ChatML turns, <think> reasoning, tools in <tools>, XML tool
        calls, <tool_response> results), the format the demo model is trained on. The markers are plain text here
        (256 ids): "<|im_start|>" is 12 bytes and a turn ends with the text "<|im_end|>". Other template kwargs are
        ignored, as a Jinja template ignores variables it does not use."""
        msgs, tools = normalize_messages(messages, tools, require_assistant=False)
        return render_chat(msgs, tools, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking,
                           truncate_history_thinking=truncate_history_thinking)


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
        self.end_of_turn = None                                     # the checkpoint's eos token ends a turn
        self.chat_template = self.config.get("chat_template")

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """The text of ids; special tokens (eos, <|im_end|>, ...) are left out unless skip_special_tokens=False
        (e.g. to see the end-of-turn token a model wrote), as transformers' decode does."""
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """ids and, for each, the index of its first character in text."""
        enc = self.tok.encode(text, add_special_tokens=False)
        return enc.ids, [start for start, _ in enc.offsets]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **kwargs) -> str:
        """The prompt text for `messages` (and `tools`, JSON schemas); kwargs reach the template (Nemotron 3:
        enable_thinking, truncate_history_thinking)."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat_template in tokenizer_config.json; format the prompt "
                             "yourself or add a template.")
        try:
            from jinja2.exceptions import TemplateError
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise ImportError("chat templates need jinja2: pip install jinja2") from None

        def raise_exception(message):
            raise TemplateError(message)
        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            # transformers' filter: plain json.dumps (jinja2's own sorts keys and escapes <, >, &)
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = tojson
        return env.from_string(self.chat_template).render(
            messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)


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
