"""Training data: a built-in synthetic corpus (no download), user text / JSONL files tokenized once into a
memory-mapped token file, packing into fixed-length windows, and a sampler whose state resumes exactly.

Built-in corpus (deterministic by seed, held-out split from a different seed stream), three kinds of document
with learnable structure:
    arithmetic   a conversation in Nemotron 3's chat format (chat_format.py), so that pretraining already teaches the
                 format the model is chatted with, fine-tuned in and served in:
                 "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n7+5=?<|im_end|>\n<|im_start|>assistant\n"
                 "<think>\n7+5=12.\n</think>\n12<|im_end|>\n"        (column by column, with carries, for more digits)
    retrieval    "k17=v4 k3=v9 ... (filler) ... k3? v9\n"          a key-value lookup over filler
    prose        templated sentences ("The red fox sees the old tree.")
Documents are joined with the end-of-document token and cut into windows of seq_len + 1 tokens (inputs and
next-token labels overlap by one), the usual pretraining packing; a document may span two windows.

Token files: `<name>.bin` (uint16 if the vocabulary fits, else uint32) + `<name>.json` (dtype, count, tokenizer).
Bad input (missing or empty file, invalid JSON, a JSONL line without the text field, undecodable bytes) raises
DataError naming the file and line.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from ..chat_format import END_OF_TURN, THINK_CLOSE, normalize_messages, render_chat


class DataError(ValueError):
    """Unusable training data; the message names the file (and line) and what to fix."""


# ---- the built-in corpus ----
_ADJ = ["red", "old", "quiet", "small", "bright", "tall", "green", "cold"]
_NOUN = ["fox", "tree", "river", "house", "bird", "stone", "child", "boat"]
_VERB = ["sees", "finds", "passes", "follows", "watches", "leaves"]


def arithmetic_conversation(rng: random.Random, max_digits: int = 1) -> list[dict]:
    """An addition question and its answer, with the column-by-column reasoning. One-digit operands by default:
    two-digit ones reached only ~12% in 3 minutes of the `tiny` preset on 2 cores, too slow for `make demo`."""
    a, b = rng.randrange(10 ** max_digits), rng.randrange(10 ** max_digits)
    steps, carry = [], 0
    da, db = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}{f'+{carry}' if carry else ''}={s}")
        carry = s // 10
    return [{"role": "user", "content": f"{a}+{b}=?"},
            {"role": "assistant", "content": str(a + b), "reasoning_content": f"{', '.join(steps)}."}]


def arithmetic_doc(rng: random.Random, max_digits: int = 1) -> str:
    return render_chat(arithmetic_conversation(rng, max_digits))


def retrieval_doc(rng: random.Random, n_pairs: int = 6, filler_words: int = 12) -> str:
    keys = rng.sample(range(100), n_pairs)
    pairs = {k: rng.randrange(100) for k in keys}
    filler = " ".join(rng.choice(_NOUN) for _ in range(filler_words))
    q = rng.choice(keys)
    return " ".join(f"k{k}=v{v}" for k, v in pairs.items()) + f" {filler} k{q}? v{pairs[q]}\n"


def prose_doc(rng: random.Random, sentences: int = 3) -> str:
    return " ".join(f"The {rng.choice(_ADJ)} {rng.choice(_NOUN)} {rng.choice(_VERB)} the {rng.choice(_ADJ)} "
                    f"{rng.choice(_NOUN)}." for _ in range(sentences)) + "\n"


def builtin_documents(seed: int, split: str = "train", chat_share: float = 0.0):
    """Endless deterministic stream of documents; 'heldout' draws from a disjoint seed stream. chat_share: share of
    documents that are conversations of the built-in SFT set (sft_data.py: multi-step arithmetic, lookups, tool
    calls), rendered whole in the chat format, so that a short SFT run finishes what pretraining started."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}; use 'train' or 'heldout'.")
    rng = random.Random(f"nemotron3-builtin-{seed}-{split}")
    if chat_share > 0:
        from .sft_data import builtin_record_stream      # sft_data -> chat -> data: imported when used
        chats = builtin_record_stream(seed, split)
    # three quarters arithmetic: in the chat form ~35 bytes of turn markers separate the question from the
    # reasoning that copies it, and the demo's 900 steps of `tiny` answered 80% of held-out sums right with this
    # mix against 6% with half arithmetic (one seed each; the plain "Q: ... A:" form reached 100% with half)
    kinds = (arithmetic_doc,) * 6 + (retrieval_doc, prose_doc)
    while True:
        if chat_share > 0 and rng.random() < chat_share:
            rec = next(chats)
            yield render_chat(*normalize_messages(rec["messages"], rec.get("tools")))
        else:
            yield rng.choice(kinds)(rng)


def builtin_tokens(tokenizer, n_tokens: int, seed: int = 0, split: str = "train", chat_share: float = 0.0
                   ) -> np.ndarray:
    """The first n_tokens of the built-in stream, documents separated by the tokenizer's eos id."""
    out, n = [], 0
    for doc in builtin_documents(seed, split, chat_share):
        ids = tokenizer.encode(doc) + [tokenizer.eos_token_id]
        out.append(ids)
        n += len(ids)
        if n >= n_tokens:
            break
    return np.asarray([t for ids in out for t in ids][:n_tokens], dtype=np.int64)


# ---- user files -> memory-mapped tokens ----
def read_documents(path: str, field: str = "text"):
    """Yield the documents of a .txt (the whole file), a .jsonl (one JSON object per line, text in `field`), or a
    Hugging Face `datasets` dataset saved with save_to_disk (a directory; the `datasets` package is imported then)."""
    if os.path.isdir(path):
        ds = open_hf_dataset(path, field)
        for i, text in enumerate(ds[field]):
            if not isinstance(text, str):
                raise DataError(f"{path}: row {i} of column {field!r} is {type(text).__name__}, not text.")
            yield text
        return
    if path.endswith(".jsonl"):
        for lineno, obj in read_jsonl(path):
            if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise DataError(f"{path}:{lineno}: no string field {field!r} (found {keys}); pass the right "
                                f"field name.")
            yield obj[field]
        return
    _check_file(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        yield data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 ({e.reason}); re-encode the file as UTF-8.") from None


def _check_file(path: str) -> None:
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file.")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: the file is empty.")


def read_jsonl(path: str):
    """Yield (line number, parsed JSON value) for each non-blank line; DataError names the file:line of a line
    that is not UTF-8 or not JSON."""
    _check_file(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start}); re-encode the "
                                f"file as UTF-8.") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}).") from None


def open_hf_dataset(path: str, column: str):
    """A dataset saved with save_to_disk (its 'train' split if it is a DatasetDict), checked to have `column`."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} is a directory; reading a Hugging Face dataset needs `pip install datasets`.") \
            from None
    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError as e:
        raise DataError(f"{path}: not a dataset saved with save_to_disk ({e}).") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (has {sorted(ds)}).")
        ds = ds["train"]
    if column not in ds.column_names:
        raise DataError(f"{path}: no column {column!r} (columns {ds.column_names}); pass the right field name.")
    return ds


def tokenize_to_file(paths: list[str], tokenizer, out_prefix: str, field: str = "text") -> str:
    """Tokenize documents once into out_prefix.bin (+ .json metadata); returns the .bin path. Written to a
    temporary name and renamed, so an interrupted run leaves no half file behind."""
    dtype = np.uint16 if tokenizer.vocab_size <= 2 ** 16 else np.uint32
    tmp = out_prefix + ".bin.tmp"
    count = 0
    try:
        with open(tmp, "wb") as f:
            for path in paths:
                for doc in read_documents(path, field):
                    ids = np.asarray(tokenizer.encode(doc) + [tokenizer.eos_token_id], dtype=dtype)
                    f.write(ids.tobytes())
                    count += len(ids)
        if count == 0:
            raise DataError(f"{paths}: no tokens (all documents empty).")
    except BaseException:
        os.remove(tmp)
        raise
    os.replace(tmp, out_prefix + ".bin")
    with open(out_prefix + ".json", "w") as f:
        json.dump({"dtype": np.dtype(dtype).name, "count": count, "sources": list(paths)}, f)
    return out_prefix + ".bin"


def load_token_file(bin_path: str) -> np.ndarray:
    meta_path = bin_path[:-len(".bin")] + ".json"
    if not os.path.exists(meta_path):
        raise DataError(f"{bin_path}: metadata {meta_path} is missing; re-run tokenization.")
    with open(meta_path) as f:
        meta = json.load(f)
    return np.memmap(bin_path, dtype=np.dtype(meta["dtype"]), mode="r", shape=(meta["count"],))


# ---- packing and sampling ----
class PackedWindows:
    """Non-overlapping windows of seq_len + 1 tokens over a token array (the tail that does not fill one is dropped)."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        if len(tokens) < seq_len + 1:
            raise DataError(f"the data has {len(tokens)} tokens, fewer than one window of seq_len + 1 = "
                            f"{seq_len + 1}; add data or lower --seq-len.")
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, i: int) -> torch.Tensor:
        s = i * self.seq_len
        return torch.from_numpy(np.asarray(self.tokens[s:s + self.seq_len + 1], dtype=np.int64))


def document_position_ids(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(b, L) positions inside each document of a window: 0 at the window's start and after every end-of-document
    token (which stays the last token of its document), counting up in between."""
    b, L = ids.shape
    starts = torch.nn.functional.pad(ids[:, :-1] == eos_id, (1, 0), value=True)          # (b, L)
    t = torch.arange(L).expand(b, L)
    return t - torch.where(starts, t, 0).cummax(dim=1).values


@dataclass
class SamplerState:
    epoch: int = 0
    position: int = 0                  # windows already served in this epoch


class ResumableSampler:
    """Shuffled batches of window indices; epoch e uses permutation seed (seed, e). state() / load() resume exactly.
    With world_size > 1 each rank takes every world_size-th window of a global batch."""

    def __init__(self, n_windows: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if n_windows < batch_size * world_size:
            raise DataError(f"{n_windows} windows cannot fill a global batch of {batch_size * world_size}; add data "
                            f"or lower --batch-size / --seq-len.")
        self.n, self.batch_size, self.seed = n_windows, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.state = SamplerState()

    def _perm(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))

    def next_batch(self) -> list[int]:
        g = self.batch_size * self.world_size
        if self.state.position + g > self.n:                                   # drop the ragged end of an epoch
            self.state = SamplerState(self.state.epoch + 1, 0)
        idx = self._perm(self.state.epoch)[self.state.position:self.state.position + g]
        self.state.position += g
        return idx[self.rank::self.world_size].tolist()

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "position": self.state.position}

    def load_state_dict(self, d: dict) -> None:
        self.state = SamplerState(int(d["epoch"]), int(d["position"]))


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the best context-free model, the token frequencies: the baseline a trained
    model's held-out loss must beat."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def arithmetic_prompts(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """n held-out additions as (chat prompt ending in the generation prompt "<|im_start|>assistant\n<think>\n",
    answer)."""
    rng = random.Random(f"nemotron3-arithmetic-eval-{seed}")
    out = []
    for _ in range(n):
        conv = arithmetic_conversation(rng)
        out.append((render_chat(conv[:1], add_generation_prompt=True), int(conv[1]["content"])))
    return out


def answer_after_thought(text: str) -> str | None:
    """The answer a completion gives after closing its thought ("...</think>\n12<|im_end|>" -> "12"), or None."""
    if THINK_CLOSE not in text:
        return None
    return text.split(THINK_CLOSE, 1)[1].split(END_OF_TURN, 1)[0].strip()


def arithmetic_accuracy(model, tokenizer, n: int = 40, seed: int = 0, max_new_tokens: int = 64) -> float:
    """Share of n held-out additions whose greedy answer after the model's own <think> steps is right."""
    correct = 0
    for prompt, answer in arithmetic_prompts(n, seed):
        ids = torch.tensor([tokenizer.encode(prompt)], device=model.lm_head.weight.device)
        out = model.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id)
        correct += answer_after_thought(tokenizer.decode(out[0, ids.shape[1]:].tolist())) == str(answer)
    return correct / n
