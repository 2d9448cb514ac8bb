"""The long-context training stage's data: rows of long and of short documents mixed in a given ratio.

Nemotron 3 Nano's long-context continued pretraining (paper §2.5) trains on a mix of very long (512K) and short (4K)
sequences at a constant learning rate, because long sequences alone hurt short-context scores. Here
`--mix 65536:0.2,4096:0.8` means: every training row holds R = 65536 tokens (the longest length of the mix); a row
is a "65536" row with probability 0.2 and a "4096" row with probability 0.8. A row of class L holds R tokens of a
stream of documents of about L tokens each (train/long_docs.py: retrieval and multi-hop tasks whose answer sits L
tokens back, each followed by the end-of-document token), so a short row packs ~R / L short documents and a long
row one long document. Every row starts at the start of a document: the document the previous row of its class
cut off is served again whole (its head, already seen, repeats). Windows cut anywhere would split nearly every
document whose length is close to R, so that its answer often trains without its needle in the context.
position_ids restart after every end-of-document token (data.document_position_ids), so attention (one causal
attention per document), Mamba states, MTP and the loss stay inside each document: a short row trains exactly as
R / L separate short sequences, without padding, and every micro-batch is one (b, R) tensor whatever it mixes.
Shares are therefore shares of rows and of tokens.
With answer_weight != 1 (--answer-weight) a micro-batch also carries loss_weights: each document's answer line
weighs answer_weight, every other target 1 (a 7-digit answer is ~1% of a 1K-token document's loss otherwise).

The class of row i is drawn from its own seeded generator (seed, rank, i), so the mix is deterministic and a
resumed run continues the same rows; each class's document stream is consumed in order and its position is part
of state_dict(). Under data parallelism rank r takes documents r, r + W, r + 2W, ... of every stream.
Left out: the downscaled general pretraining data the paper also mixes in (the short class here is retrieval
documents too); sequence-parallel attention for rows beyond one device's memory.
"""

from __future__ import annotations

import random

import torch

from .data import DataError, document_position_ids
from .long_docs import MIN_PROMPT_TOKENS, TRAIN_TASKS, check_tasks, long_document_parts


def parse_mix(spec: str) -> list[tuple[int, float]]:
    """'65536:0.2,4096:0.8' -> [(65536, 0.2), (4096, 0.8)]: distinct lengths >= 16, shares > 0 summing to 1."""
    mix = []
    for part in spec.split(","):
        try:
            length, share = part.split(":")
            mix.append((int(length), float(share)))
        except ValueError:
            raise ValueError(f"--mix {spec!r}: {part!r} is not LENGTH:SHARE; write e.g. --mix 65536:0.2,4096:0.8 "
                             f"(row lengths in tokens, shares of rows summing to 1).") from None
    lengths = [n for n, _ in mix]
    if any(n < 16 for n in lengths) or len(set(lengths)) != len(lengths):
        raise ValueError(f"--mix {spec!r}: lengths must be distinct and >= 16 tokens.")
    if any(not s > 0 for _, s in mix) or abs(sum(s for _, s in mix) - 1) > 1e-6:
        raise ValueError(f"--mix {spec!r}: shares must be > 0 and sum to 1 (they sum to "
                         f"{sum(s for _, s in mix):g}).")
    return mix


class _DocumentStream:
    """The token stream of one length class: documents of `length` tokens (prompt = length - answer margin) joined
    by eos, read in order from document `index`, offset `offset` tokens into it."""

    ANSWER_MARGIN = 64           # tokens left for the answer line, so a document spans about `length` tokens

    def __init__(self, tokenizer, length: int, seed: int, split: str, rank: int, world: int,
                 answer_weight: float = 1.0, tasks: tuple[str, ...] = TRAIN_TASKS):
        shortest = max(MIN_PROMPT_TOKENS[t] for t in tasks) + self.ANSWER_MARGIN
        if length < shortest:
            raise DataError(f"--mix length {length} is shorter than the built-in long documents of tasks "
                            f"{','.join(tasks)} (their task prompts need about {shortest} tokens); use lengths >= "
                            f"{shortest}, or fewer / shorter tasks (--long-tasks).")
        self.tokenizer, self.length, self.seed, self.split, self.tasks = tokenizer, length, seed, split, tasks
        self.rank, self.world = rank, world
        self.answer_weight = answer_weight
        self.index, self.offset = 0, 0
        self._doc: list[int] | None = None
        self._weights: list[float] = []

    def _document(self) -> list[int]:
        if self._doc is None:
            try:
                prompt, answer = long_document_parts(self.tokenizer, self.length - self.ANSWER_MARGIN,
                                                     self.index * self.world + self.rank, self.seed, self.split,
                                                     self.tasks)
            except ValueError as e:                       # a tokenizer whose task prompts need more tokens
                raise DataError(f"--mix length {self.length}: {e}") from None
            eos = self.tokenizer.eos_token_id
            text = self.tokenizer.encode(prompt + answer)
            self._doc = text + ([eos] if eos is not None else [])
            n_prompt = len(self.tokenizer.encode(prompt))
            # a label's weight is its target token's: the answer line's tokens weigh answer_weight, the rest 1
            self._weights = [1.0] * n_prompt + [self.answer_weight] * (len(text) - n_prompt)
            self._weights += [1.0] * (len(self._doc) - len(text))
        return self._doc

    def take(self, n: int) -> list[int]:
        """The next n tokens, starting with the document the last call cut off (if it fits in n tokens)."""
        if self.offset > 0 and len(self._document()) <= n:
            self.offset = 0
        out: list[int] = []
        self.taken_weights: list[float] = []     # the loss weight of each token returned
        while len(out) < n:
            doc = self._document()
            part = doc[self.offset:self.offset + n - len(out)]
            out += part
            self.taken_weights += self._weights[self.offset:self.offset + len(part)]
            self.offset += len(part)
            if self.offset == len(doc):
                self.index, self.offset, self._doc = self.index + 1, 0, None
        return out


class MixedLengthRows:
    """Micro-batches {input_ids, labels, position_ids} of `batch_size` rows of R tokens (R = the mix's longest
    length), each row's class drawn by the mix's shares; an iterator with state_dict / load_state_dict (exact
    resume). `classes` records the class length of every row served, in order (for tests and logs)."""

    def __init__(self, tokenizer, mix: list[tuple[int, float]], batch_size: int, seed: int = 0,
                 split: str = "train", rank: int = 0, world: int = 1, answer_weight: float = 1.0,
                 tasks: tuple[str, ...] = TRAIN_TASKS):
        check_tasks(tasks)
        if tokenizer.eos_token_id is None:
            raise DataError("the long-context mix needs a tokenizer with an end-of-document token (eos) to keep "
                            "documents apart.")
        self.mix, self.batch_size, self.seed, self.rank, self.world = mix, batch_size, seed, rank, world
        self.row_len = max(n for n, _ in mix)
        self.eos = tokenizer.eos_token_id
        if not answer_weight > 0:
            raise ValueError(f"--answer-weight {answer_weight} must be > 0 (1 = every token weighs the same).")
        self.answer_weight = answer_weight
        self.streams = {n: _DocumentStream(tokenizer, n, seed, split, rank, world, answer_weight, tasks)
                        for n, _ in mix}
        self.rows_served = 0
        self.classes: list[int] = []

    def _row_class(self, i: int) -> int:
        rng = random.Random(f"nemotron3-mix/{self.seed}/{self.rank}/{i}")
        u, acc = rng.random(), 0.0
        for n, share in self.mix:
            acc += share
            if u < acc:
                return n
        return self.mix[-1][0]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rows, weights = [], []
        for _ in range(self.batch_size):
            n = self._row_class(self.rows_served)
            self.rows_served += 1
            self.classes.append(n)
            rows.append(self.streams[n].take(self.row_len))
            weights.append(self.streams[n].taken_weights)
        ids = torch.tensor(rows, dtype=torch.long)                                     # (b, R)
        batch = {"input_ids": ids, "labels": ids, "position_ids": document_position_ids(ids, self.eos)}
        if self.answer_weight != 1.0:
            batch["loss_weights"] = torch.tensor(weights)                              # (b, R), per label
        return batch

    def in_order(self, n_batches: int) -> list[dict]:
        """The next n_batches micro-batches (a held-out split's fixed evaluation set)."""
        return [next(self) for _ in range(n_batches)]

    def state_dict(self) -> dict:
        return {"rows_served": self.rows_served,
                "streams": {str(n): [s.index, s.offset] for n, s in self.streams.items()}}

    def load_state_dict(self, d: dict) -> None:
        self.rows_served = int(d["rows_served"])
        for n, (index, offset) in d["streams"].items():
            s = self.streams[int(n)]
            s.index, s.offset, s._doc = int(index), int(offset), None
