"""Continuous batching against the engine: requests that join and leave a running batch at different times get
exactly the tokens they get alone (greedy), plainly and with MTP speculation; compaction keeps that true."""

import pytest

from nemotron3.infer import Engine, Request
from nemotron3.serve import Batcher
from nemotron3.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
PROMPTS = ["Q: 3+4=?\n<think>", "The cat", "Q: 8+9=?\n<think>", "hello there, this is a longer prompt than most"]


@pytest.mark.parametrize("K", [0, 3])
def test_joining_and_leaving_changes_no_output(trained, K):
    ref = [Engine(trained, TOK).generate([Request(TOK.encode(p), 30)])[0].token_ids for p in PROMPTS]
    b = Batcher(trained, TOK, max_batch=3, num_speculative_tokens=K, max_len=80, prefill_chunk=16)   # chunked too
    out, pending = {}, [3, 2]
    b.add(Request(TOK.encode(PROMPTS[0]), 30), 0)
    for _ in range(4):
        b.step()
    b.add(Request(TOK.encode(PROMPTS[1]), 30), 1)
    steps = 0
    while b.active():
        b.step()
        steps += 1
        if steps % 5 == 0:
            b.compact()                                # packing the visible entries changes nothing
        for slot, (row, key) in enumerate(zip(b.rows, b.keys)):
            if key is not None and row.done:
                out[key] = row.tokens
                b.release(slot)
                if pending:
                    i = pending.pop()
                    b.add(Request(TOK.encode(PROMPTS[i]), 30), i)
    assert [out[i] for i in range(4)] == ref
    assert b.compactions > 0
    with pytest.raises(ValueError, match="server's context"):
        b.add(Request(TOK.encode("x" * 150), 30))
