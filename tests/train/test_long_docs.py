"""Long training documents. Oracles: the documents' own bytes (byte tokenizer), the needle / chain text read back
with regular expressions, and Python's collections on the token stream."""

import re

import pytest

from nemotron3.tokenizer import ByteTokenizer
from nemotron3.train.long_docs import TRAIN_TASKS, long_document, long_documents, long_tokens

BYTES = ByteTokenizer()


def test_documents_end_with_the_answer_the_haystack_holds():
    for i, doc in zip(range(12), long_documents(BYTES, 1500, seed=3)):
        prompt, answer = doc[:1500], doc[1500:]
        assert len(prompt.encode()) == 1500 and answer.endswith("\n")
        if "VAR " in prompt:                                          # multi-hop: every named variable is in a chain
            for name in answer.split():
                assert re.search(rf"VAR {name} = ", prompt)
        else:                                                         # retrieval: each value sits in a needle
            for value in answer.strip().split(", "):
                assert re.search(rf"is: {re.escape(value)}\.", prompt)


def test_the_stream_mixes_the_training_tasks_and_is_deterministic():
    docs = [long_document(BYTES, 1200, i, seed=0) for i in range(40)]
    assert docs == [long_document(BYTES, 1200, i, seed=0) for i in range(40)]
    assert any("VAR " in d for d in docs) and any("Some special magic uuids" in d for d in docs)
    assert any("for " in d and ", and " in d for d in docs)                          # a multi-query question
    assert not set(docs) & {long_document(BYTES, 1200, i, seed=0, split="heldout") for i in range(40)}
    assert "vt" in TRAIN_TASKS and "cwe" not in TRAIN_TASKS


def test_long_tokens_pack_documents_of_both_lengths_between_eos():
    toks = long_tokens(BYTES, 20_000, lengths=(2048, 700), seed=1)
    assert len(toks) == 20_000
    pieces = bytes(toks.tolist()).split(b"\x00")[:-1]                 # complete documents only
    # prompt of 2048 or 700 tokens, then an answer of < 200 bytes (five variables or four UUIDs at most)
    kinds = [2048 <= len(p) < 2248 if len(p) >= 2048 else 700 <= len(p) < 900 for p in pieces]
    assert len(pieces) >= 8 and all(kinds) and {len(p) >= 2048 for p in pieces} == {True, False}


def test_bad_split_is_refused():
    with pytest.raises(ValueError, match="split 'test' must be 'train' or 'heldout'"):
        long_document(BYTES, 1000, 0, split="test")
