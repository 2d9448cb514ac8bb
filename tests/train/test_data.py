"""Training data. Oracles: Python's own arithmetic for the generated sums, hand-written files with known defects,
and re-running the sampler from scratch for resume."""

import json
import re

import numpy as np
import pytest

from nemotron3.tokenizer import ByteTokenizer
from nemotron3.train.data import (DataError, PackedWindows, ResumableSampler, builtin_documents, builtin_tokens,
                                  load_token_file, tokenize_to_file)


def take(gen, n):
    return [next(gen) for _ in range(n)]


def test_builtin_corpus_is_deterministic_with_a_distinct_heldout_split():
    assert take(builtin_documents(0), 50) == take(builtin_documents(0), 50)
    assert take(builtin_documents(0), 50) != take(builtin_documents(1), 50)
    assert take(builtin_documents(0, "train"), 50) != take(builtin_documents(0, "heldout"), 50)


def test_arithmetic_documents_are_correct():
    import random

    from nemotron3.train.data import arithmetic_doc
    docs = [d for d in take(builtin_documents(3), 300) if d.startswith("<|im_start|>")]
    assert len(docs) > 100
    rng = random.Random(0)
    docs += [arithmetic_doc(rng, max_digits=3) for _ in range(200)]           # carries across columns
    assert any("+1=" in d for d in docs)
    for d in docs:
        a, b, ans = map(int, re.fullmatch(r"<\|im_start\|>system\n<\|im_end\|>\n<\|im_start\|>user\n(\d+)\+(\d+)=\?"
                                          r"<\|im_end\|>\n<\|im_start\|>assistant\n<think>\n.*\n</think>\n(\d+)"
                                          r"<\|im_end\|>\n", d, re.S).groups())
        assert a + b == ans


def test_chat_share_mixes_in_the_sft_conversations_in_the_chat_format():
    from nemotron3.chat_format import normalize_messages, render_chat
    from nemotron3.train.sft_data import builtin_records
    assert take(builtin_documents(0, chat_share=0.0), 50) == take(builtin_documents(0), 50)   # default unchanged
    docs = take(builtin_documents(0, chat_share=0.5), 2000)
    records = builtin_records(2000, seed=0)
    chats = [d for d in docs if d in {render_chat(*normalize_messages(r["messages"], r.get("tools")))
                                      for r in records}]
    assert 0.45 < len(chats) / len(docs) < 0.55                         # the share, within ~4 standard deviations
    assert chats == [render_chat(*normalize_messages(r["messages"], r.get("tools"))) for r in records[:len(chats)]]
    assert any("<tool_call>" in d for d in chats)


def test_builtin_tokens_separate_documents_with_eos():
    tok = ByteTokenizer()
    t = builtin_tokens(tok, 5000, seed=0)
    assert len(t) == 5000 and t.max() < 256 and (t == tok.eos_token_id).sum() > 20


def test_tokenize_files_round_trip(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    path = tokenize_to_file([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], ByteTokenizer(),
                            str(tmp_path / "tok"))
    tokens = load_token_file(path)
    assert tokens.dtype == np.uint16
    assert ByteTokenizer().decode(tokens.tolist()) == "hello worldonetwo"
    assert (np.asarray(tokens) == 0).sum() == 3


@pytest.mark.parametrize("name,content,match", [
    ("empty.txt", b"", "empty.txt: the file is empty"),
    ("bad.jsonl", b'{"text": "ok"}\n{"txt": "x"}\n', r"bad.jsonl:2: no string field 'text' \(found \['txt'\]\)"),
    ("broken.jsonl", b'{"text": "ok"}\n{oops\n', r"broken.jsonl:2: invalid JSON"),
    ("latin.txt", b"line one\nline two caf\xe9\n", r"latin.txt:2: not UTF-8"),
])
def test_bad_data_names_file_and_line(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=match):
        tokenize_to_file([str(tmp_path / name)], ByteTokenizer(), str(tmp_path / "out"))
    assert not list(tmp_path.glob("out.bin*"))


def test_packed_windows_overlap_by_one_token():
    w = PackedWindows(np.arange(25), seq_len=8)
    assert len(w) == 3 and w[1].tolist() == list(range(8, 17))
    with pytest.raises(DataError, match="fewer than one window"):
        PackedWindows(np.arange(5), seq_len=8)


def test_sampler_resumes_exactly_and_partitions_ranks():
    full = ResumableSampler(10, batch_size=3, seed=5)
    seq = [full.next_batch() for _ in range(8)]                                 # crosses epochs
    resumed = ResumableSampler(10, batch_size=3, seed=5)
    for _ in range(3):
        resumed.next_batch()
    state = resumed.state_dict()
    again = ResumableSampler(10, batch_size=3, seed=5)
    again.load_state_dict(json.loads(json.dumps(state)))
    assert [again.next_batch() for _ in range(5)] == seq[3:]
    r0, r1 = ResumableSampler(12, 2, seed=1, rank=0, world_size=2), ResumableSampler(12, 2, seed=1, rank=1,
                                                                                      world_size=2)
    single = ResumableSampler(12, 4, seed=1)
    b0, b1, b = r0.next_batch(), r1.next_batch(), single.next_batch()
    assert sorted(b0 + b1) == sorted(b) and not set(b0) & set(b1)


def test_hugging_face_dataset_on_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["alpha", "beta"], "n": [1, 2]}).save_to_disk(str(tmp_path / "ds"))
    path = tokenize_to_file([str(tmp_path / "ds")], ByteTokenizer(), str(tmp_path / "tok"))
    assert ByteTokenizer().decode(load_token_file(path).tolist()) == "alphabeta"
    with pytest.raises(DataError, match=r"no column 'body' \(columns \['text', 'n'\]\)"):
        tokenize_to_file([str(tmp_path / "ds")], ByteTokenizer(), str(tmp_path / "tok2"), field="body")
