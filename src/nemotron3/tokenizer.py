"""Tokenizers for the command line: a byte-level one (no download, ids 0..255 are the UTF-8 bytes) and a Hugging Face
`tokenizer.json` found beside a checkpoint (through the `tokenizers` library, imported only when needed).
The training issue grows this into the data pipeline (chat templates, special tokens)."""

from __future__ import annotations

import os


class ByteTokenizer:
    """ids 0..255 are the UTF-8 bytes; 0 (NUL, absent from text) doubles as the end-of-document token."""
    vocab_size = 256
    eos_token_id = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if 0 < i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError(f"{path} needs the `tokenizers` package: pip install tokenizers") from None
        self.tok = Tokenizer.from_file(path)
        self.vocab_size = self.tok.get_vocab_size()
        self.eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))


def load_tokenizer(model_dir: str | None, vocab_size: int):
    """tokenizer.json beside the weights if there is one, else bytes (which needs vocab_size >= 256)."""
    if model_dir and os.path.exists(os.path.join(model_dir, "tokenizer.json")):
        return HFTokenizer(os.path.join(model_dir, "tokenizer.json"))
    if vocab_size < 256:
        raise ValueError(f"this model has vocab_size={vocab_size} and no tokenizer.json; text needs >= 256 ids for "
                         f"the byte tokenizer. Pass --prompt-ids instead.")
    return ByteTokenizer()
