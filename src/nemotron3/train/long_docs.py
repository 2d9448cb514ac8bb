"""Long documents for the long-context training stage, built in (no download) and deterministic by seed.

Nemotron 3 Nano's long-context continued pretraining (paper §2.5) mixes long-document QA, 1% synthetic retrieval
data and downscaled phase-2 data, in a mix of very long (512K) and short (4K) sequences, because long-only
sequences hurt short-context scores. At our scale the built-in corpus has no long documents of its own, so this
file supplies the synthetic part: each document is one instance of a retrieval or multi-hop task with its answer
written out, so that a tiny model is rewarded for using context thousands of tokens back:
    retrieval   needles "One of the special magic numbers for KEY is: VALUE." in essay-like or noise filler (one
                needle, several keys, several values, several queries), then the question and the answer
    multi-hop   a chain VAR A = 12345, VAR B = VAR A, ... spread through noise, then every variable holding 12345

The instances come from eval/ruler.py's task generators (one implementation of each task), drawn in their own
seed namespace "nemotron3-longdoc/<split>", disjoint from the evaluation's "nemotron3-ruler", with a random needle
depth per document. The aggregation tasks (cwe, fwe) are left out of training: they measure whether retrieval
skill carries over to counting. What the trainer does with these documents (mixing ratio with the short corpus,
packing) is its choice; `long_tokens` packs them like train/data.py's builtin_tokens.
"""

from __future__ import annotations

import random

import numpy as np

from ..eval.ruler import make_sample

TRAIN_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
               "niah_multivalue", "niah_multiquery", "vt")
LONGDOC_NAMESPACE = "nemotron3-longdoc"
# the shortest prompt (byte tokens) every document of each task fits in: its question, answer prefix and needles
# with an empty haystack, the longest over the stream's random keys and names, rounded up to 16
# (measured over 300 documents, plus 16 tokens of slack), rounded up to 16; tests check them over other documents
MIN_PROMPT_TOKENS = {"niah_single_1": 400, "niah_single_2": 400, "niah_single_3": 416, "niah_multikey_1": 592,
                     "niah_multikey_2": 400, "niah_multivalue": 608, "niah_multiquery": 704, "vt": 432}


def check_tasks(tasks: tuple[str, ...]) -> tuple[str, ...]:
    """tasks, if they are a non-empty subset of TRAIN_TASKS; else a ValueError saying which ones are."""
    if not tasks or any(t not in TRAIN_TASKS for t in tasks):
        raise ValueError(f"long-document tasks {','.join(tasks) or '(none)'}: choose one or more of "
                         f"{','.join(TRAIN_TASKS)} (the aggregation tasks cwe and fwe stay out of training).")
    return tasks


def long_document_parts(tokenizer, length: int, index: int, seed: int = 0, split: str = "train",
                        tasks: tuple[str, ...] = TRAIN_TASKS) -> tuple[str, str]:
    """Document `index` of the stream as (task prompt of exactly `length` tokens, its gold answer and a newline)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split {split!r} must be 'train' or 'heldout'.")
    rng = random.Random(f"{LONGDOC_NAMESPACE}/{split}/{seed}/{index}/choice")
    sample = make_sample(rng.choice(tasks), length, index, tokenizer, depth=rng.random(), seed=seed, distractors=0,
                         namespace=f"{LONGDOC_NAMESPACE}/{split}")
    return sample.prompt, sample.candidates[0] + "\n"


def long_document(tokenizer, length: int, index: int, seed: int = 0, split: str = "train",
                  tasks: tuple[str, ...] = TRAIN_TASKS) -> str:
    """Document `index` of the stream: a task prompt of exactly `length` tokens, its gold answer and a newline."""
    return "".join(long_document_parts(tokenizer, length, index, seed, split, tasks))


def long_documents(tokenizer, length: int, seed: int = 0, split: str = "train",
                   tasks: tuple[str, ...] = TRAIN_TASKS):
    """Endless stream of long documents with prompts of `length` tokens."""
    index = 0
    while True:
        yield long_document(tokenizer, length, index, seed, split, tasks)
        index += 1


def long_tokens(tokenizer, n_tokens: int, lengths: tuple[int, ...] = (4096, 512), seed: int = 0,
                split: str = "train", tasks: tuple[str, ...] = TRAIN_TASKS) -> np.ndarray:
    """n_tokens of documents joined by the end-of-document token; each document's prompt length is drawn uniformly
    from `lengths` (the long/short mix of the paper's long-context stage)."""
    rng = random.Random(f"{LONGDOC_NAMESPACE}/{split}/{seed}/lengths")
    eos = tokenizer.eos_token_id
    out, total, index = [], 0, 0
    while total < n_tokens:
        ids = tokenizer.encode(long_document(tokenizer, rng.choice(lengths), index, seed, split, tasks))
        ids = ids + [eos] if eos is not None else ids
        out.append(ids)
        total += len(ids)
        index += 1
    return np.asarray([t for ids in out for t in ids][:n_tokens], dtype=np.int64)
