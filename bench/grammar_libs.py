"""Which grammar library serves structured output here: llguidance vs xgrammar on this CPU, with the byte
tokenizer's 256-token vocabulary and a small JSON schema (the server's json_schema path).

    python bench/grammar_libs.py            # a few seconds

Measured per library: time to compile the schema into a matcher, and the mean / max time of one next-token mask
while a fixed valid document is consumed byte by byte (each mask is checked to allow the document's next byte and,
at the end, the end-of-text token). Writes bench/results/grammar_libs.json.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, save  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string"}}}}
DOC = json.dumps({"name": "Ada Lovelace", "age": 36, "tags": ["math", "engine", "notes"]}, separators=(",", ":"))
VOCAB = [bytes([i]) for i in range(256)]


def bench_llguidance() -> dict:
    import llguidance as llg
    import llguidance.torch as llt

    class Bytes:
        eos_token_id, bos_token_id, special_token_ids = 0, None, [0]
        tokens = [b"\xff[EOS]"] + VOCAB[1:]

        def __call__(self, s):
            return list(s)
    t0 = time.perf_counter()
    tok = llg.LLTokenizer(llg.TokenizerWrapper(Bytes()))
    m = llg.LLMatcher(tok, llg.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False}))
    compile_s, mask, times = time.perf_counter() - t0, llt.allocate_token_bitmask(1, 256), []
    for b in DOC.encode():
        t = time.perf_counter()
        llt.fill_next_token_bitmask(m, mask, 0)
        times.append(time.perf_counter() - t)
        assert (int(mask[0, b // 32]) >> (b % 32)) & 1, b
        m.consume_token(b)
    llt.fill_next_token_bitmask(m, mask, 0)
    assert int(mask[0, 0]) & 1                               # end of text allowed once the document is complete
    return dict(library="llguidance", compile_ms=compile_s * 1e3, mask_us_mean=sum(times) / len(times) * 1e6,
                mask_us_max=max(times) * 1e6)


def bench_xgrammar() -> dict:
    import xgrammar as xgr
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo(VOCAB, vocab_type=xgr.VocabType.RAW, vocab_size=256, stop_token_ids=[0])
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False,
                                                             separators=(",", ":"))
    m = xgr.GrammarMatcher(compiled)
    compile_s, mask, times = time.perf_counter() - t0, xgr.allocate_token_bitmask(1, 256), []
    for b in DOC.encode():
        t = time.perf_counter()
        m.fill_next_token_bitmask(mask, 0)
        times.append(time.perf_counter() - t)
        assert m.accept_token(b), b
    return dict(library="xgrammar", compile_ms=compile_s * 1e3, mask_us_mean=sum(times) / len(times) * 1e6,
                mask_us_max=max(times) * 1e6)


def main():
    rows = []
    for fn in (bench_llguidance, bench_xgrammar):
        try:
            rows.append(fn())
        except ImportError as e:
            rows.append(dict(library=fn.__name__[6:], error=f"not installed: {e}"))
    print_table(rows, ["library", "compile_ms", "mask_us_mean", "mask_us_max"])
    print(f"wrote {save('grammar_libs', dict(rows=rows))}")


if __name__ == "__main__":
    main()
