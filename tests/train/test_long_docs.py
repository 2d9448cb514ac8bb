"""Long training documents. Oracles: the documents' own bytes (byte tokenizer), the needle / chain text read back
with regular expressions, and Python's collections on the token stream."""

import re

import pytest

from nemotron3.eval.haystack import NOISE_PASSAGE
from nemotron3.tokenizer import ByteTokenizer
from nemotron3.train.long_docs import (MIN_PROMPT_TOKENS, TRAIN_TASKS, check_tasks, long_document,
                                       long_document_parts, long_documents, long_tokens)

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


@pytest.mark.parametrize("task", TRAIN_TASKS)
def test_every_document_of_a_task_fits_its_minimum_prompt(task):
    # oracle: the generator itself at exactly that prompt length, on documents other than those the table was
    # measured on (indices 300..) and on the held-out split; the table is not loose: 64 tokens less fails for some
    for split in ("train", "heldout"):
        for i in range(300, 340):
            prompt, _ = long_document_parts(BYTES, MIN_PROMPT_TOKENS[task], i, seed=5, split=split, tasks=(task,))
            assert len(BYTES.encode(prompt)) == MIN_PROMPT_TOKENS[task]
    failed = 0
    for i in range(40):
        try:
            long_document_parts(BYTES, MIN_PROMPT_TOKENS[task] - 64, i, tasks=(task,))
        except ValueError as e:
            failed += "without any haystack" in str(e)
    assert failed > 0


def test_a_task_subset_writes_only_those_tasks():
    docs = [long_document(BYTES, 600, i, seed=2, tasks=("niah_single_1", "vt")) for i in range(30)]
    vt = [d for d in docs if "VAR " in d]
    niah = [d for d in docs if "special magic numbers" in d]
    assert len(vt) + len(niah) == 30 and vt and niah
    assert all(NOISE_PASSAGE in d and "for " in d.split("What are all")[1] for d in niah)   # noise haystack, 1 key
    with pytest.raises(ValueError, match="choose one or more of"):
        check_tasks(("niah_single_1", "cwe"))
