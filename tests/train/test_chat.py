"""SFT conversation data. Oracles: the assistant turns found by a regular expression over the rendered text
(`<|im_start|>assistant\\n` + the generation prompt ... `<|im_end|>`) and hand-written expected spans, for the loss
mask with the byte tokenizer and with a BPE tokenizer rendering NVIDIA's template (tests/reference/nano3_template.py);
binomial tolerances for the augmentation shares; a per-conversation loop for the loss weights; re-running from
scratch for resume; hand-written files with known defects for the errors."""

import json
import random
import re

import numpy as np
import pytest
import torch

from nemotron3.chat_format import FORCED_THINK_CLOSE
from nemotron3.tokenizer import ByteTokenizer, HFTokenizer
from nemotron3.train.chat import (PackedConversations, PackingConfig, augment, conversation_from_record,
                                  encode_conversation, load_conversations)
from nemotron3.train.data import DataError
from tests.reference.nano3_template import NANO3_TEMPLATE
from tests.test_chat_format import CALC, LOOKUP, TOOL_LOOP

TOK = ByteTokenizer()


def conv(messages, tools=None):
    return conversation_from_record({"messages": messages, "tools": tools}, "test")


def decode(tok, ids):
    """Text including special tokens (HF decoding drops them by default)."""
    return tok.tok.decode(ids, skip_special_tokens=False) if isinstance(tok, HFTokenizer) else tok.decode(ids)


def trained_runs(enc, tok):
    """The decoded text of each maximal run of trained tokens."""
    runs, cur = [], []
    for i, m in zip(enc.input_ids.tolist(), enc.loss_mask.tolist()):
        if m:
            cur.append(i)
        elif cur:
            runs.append(decode(tok, cur))
            cur = []
    return runs + ([decode(tok, cur)] if cur else [])


def regex_spans(text):
    """Assistant turns as the format writes them: after '<|im_start|>assistant\\n<think>\\n' (or '<think></think>')
    through '<|im_end|>'."""
    return [m.group(1) for m in re.finditer(r"<\|im_start\|>assistant\n(?:<think>\n(?!</think>)|<think></think>)?"
                                            r"(.*?<\|im_end\|>)", text, re.S)]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    from tests.test_tokenizer import write_test_tokenizer
    d = write_test_tokenizer(tmp_path_factory.mktemp("bpe"))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = NANO3_TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return HFTokenizer(str(d / "tokenizer.json"))


@pytest.mark.parametrize("which", ["bytes", "bpe"])
def test_loss_mask_covers_exactly_the_assistant_turns(which, bpe):
    tok = TOK if which == "bytes" else bpe
    c = conv(TOOL_LOOP, [CALC, LOOKUP])
    enc = encode_conversation(c, tok)
    text = decode(tok, enc.input_ids.tolist())
    assert trained_runs(enc, tok) == regex_spans(text)
    assert trained_runs(enc, tok) == [                                  # by hand, from the format's definition
        "\n<tool_call>\n<function=calculator>\n<parameter=expression>\n37*45\n"
        "</parameter>\n<parameter=precision>\n0\n</parameter>\n<parameter=opts>\n{\"exact\": true}\n</parameter>\n"
        "<parameter=tags>\n[\"a\", 1]\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=lookup>\n"
        "<parameter=key>\nk7\n</parameter>\n</function>\n</tool_call>\n<|im_end|>",  # earlier turns: thought dropped
        "\n1665<|im_end|>",
        "Easy, but check.\n</think>\nChecking.\n<tool_call>\n<function=calculator>\n<parameter=expression>\n2+2\n"
        "</parameter>\n<parameter=flag>\nFalse\n</parameter>\n</function>\n</tool_call>\n<|im_end|>",
        "4<|im_end|>"]
    # token by token: trained iff the token's text lies inside one of the oracle's spans
    starts = [m.start(1) for m in re.finditer(r"<\|im_start\|>assistant\n(?:<think>\n(?!</think>)|<think></think>)?"
                                              r"(.*?<\|im_end\|>)", text, re.S)]
    spans = [(s, s + len(r)) for s, r in zip(starts, regex_spans(text))]
    pos = 0
    for i, m in zip(enc.input_ids.tolist(), enc.loss_mask.tolist()):
        piece = decode(tok, [i])
        inside = any(s <= pos < e for s, e in spans)
        assert m == inside, (pos, piece)
        pos += len(piece)


def test_forced_close_can_be_kept_out_of_the_loss():
    c = conv([{"role": "user", "content": "2+3+4=?"},
              {"role": "assistant", "content": "9", "reasoning_content": "2+3=5, 5+4=9."}])
    rng = random.Random(0)
    while True:
        aug, kind, i = augment(c, rng, TOK, 0.0, 1.0)
        cut = aug.messages[1]["reasoning_content"]
        if len(cut) > 3:
            break
    assert kind == "truncated" and "2+3=5, 5+4=9.".startswith(cut[:-1])
    assert trained_runs(encode_conversation(aug, TOK), TOK) == [cut + "\n</think>\n\n9<|im_end|>"]
    assert trained_runs(encode_conversation(aug, TOK, unmasked_close=i), TOK) == [cut[:-1], "9<|im_end|>"]


def test_augmentation_shares_match_the_nano_recipe_on_10k_samples():
    c = conv([{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
              {"role": "assistant", "content": "answer", "reasoning_content": "step one then step two and three"}])
    n, kinds, fractions = 10_000, {"none": 0, "reasoning_off": 0, "truncated": 0}, []
    reasoning = c.messages[2]["reasoning_content"]
    for k in range(n):
        aug, kind, _ = augment(c, random.Random(f"s-{k}"), TOK, 0.10, 0.03)
        kinds[kind] += 1
        text = TOK.apply_chat_template(aug.messages, add_generation_prompt=False)
        if kind == "reasoning_off":
            assert text.endswith("<|im_start|>assistant\n<think></think>answer<|im_end|>\n")
        elif kind == "truncated":
            cut = aug.messages[2]["reasoning_content"][:-1]
            assert reasoning.startswith(cut) and len(cut) < len(reasoning)
            assert text.endswith(f"<think>\n{cut}{FORCED_THINK_CLOSE}answer<|im_end|>\n")
            fractions.append(len(cut) / len(reasoning))
        else:
            assert aug is c
    # binomial sd: sqrt(.1*.9/1e4) = 0.003, sqrt(.03*.97/1e4) = 0.0017; tolerances are ~3.5 sd
    assert abs(kinds["reasoning_off"] / n - 0.10) < 0.01
    assert abs(kinds["truncated"] / n - 0.03) < 0.006
    assert abs(np.mean(fractions) - 0.5) < 0.06                  # budgets uniform over the trace's length


def make_convs(n, seed=0):
    rng = random.Random(seed)
    out = []
    for k in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        msgs = [{"role": "user", "content": f"{a}+{b}=?"},
                {"role": "assistant", "content": str(a + b),
                 "reasoning_content": f"{a}+{b}={a + b}." * rng.randrange(1, 4)}]
        if k % 3 == 0:
            msgs += [{"role": "user", "content": "again"}, {"role": "assistant", "content": str(a + b)}]
        out.append(conv(msgs))
    return out


def test_packed_rows_restart_positions_and_hold_every_conversation_once_per_epoch():
    convs = make_convs(60)
    data = PackedConversations(convs, TOK, PackingConfig(seq_len=256, batch_size=2, reasoning_off_share=0.0,
                                                         truncate_share=0.0))
    rows = data.rows(0)
    assert sorted(i for r in rows for i in r) == list(range(60))
    batch = data.collate(rows[:3])
    for b, row in enumerate(rows[:3]):
        encs = [encode_conversation(convs[i], TOK) for i in row]
        t = 0
        for e in encs:
            n = len(e.input_ids)
            assert batch["input_ids"][b, t:t + n].tolist() == e.input_ids.tolist()
            assert batch["position_ids"][b, t:t + n].tolist() == list(range(n))
            assert batch["labels"][b, t].item() == -100                    # a conversation starts untrained
            t += n
        assert (batch["labels"][b, t:] == -100).all() and batch["position_ids"][b, t:].tolist() == list(range(256 - t))
    alone = PackedConversations(convs, TOK, PackingConfig(seq_len=256, batch_size=2, pack=False)).rows(0)
    assert sorted(r[0] for r in alone) == list(range(60)) and {len(r) for r in alone} == {1}


def test_resume_and_ranks_reproduce_the_uninterrupted_stream():
    convs = make_convs(80)
    cfg = PackingConfig(seq_len=128, batch_size=2, seed=3)
    full = PackedConversations(convs, TOK, cfg)
    stream = [full.next_batch() for _ in range(len(full.rows(0)) // 2 + 3)]      # crosses an epoch
    part = PackedConversations(convs, TOK, cfg)
    for _ in range(4):
        part.next_batch()
    resumed = PackedConversations(convs, TOK, cfg)
    resumed.load_state_dict(json.loads(json.dumps(part.state_dict())))
    for want in stream[4:]:
        got = resumed.next_batch()
        assert all(torch.equal(got[k], want[k]) for k in ("input_ids", "labels", "position_ids"))
    wide = PackedConversations(convs, TOK, PackingConfig(seq_len=128, batch_size=4, seed=3)).next_batch()
    r0, r1 = (PackedConversations(convs, TOK, cfg, rank=r, world_size=2).next_batch() for r in (0, 1))
    assert torch.equal(torch.cat([r0["input_ids"], r1["input_ids"]]), wide["input_ids"])


def test_long_conversations_are_dropped_and_counted():
    convs = make_convs(40) + [conv([{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "y"}])]
    logs = []
    data = PackedConversations(convs, TOK, PackingConfig(seq_len=256, batch_size=2), log=logs.append)
    assert len(data.convs) == 40 and re.match(r"dropped 1 of 41 conversations longer than seq_len=256 tokens "
                                              r"\(longest 407\)", logs[0])          # 30 + 17 + 300 + 11 + 49 bytes


@pytest.mark.parametrize("line,match", [
    ('{"messages": [{"role": "bot", "content": "x"}]}', r"chats.jsonl:2: messages\[0\]\.role: unknown role 'bot'"),
    ('{"messages": [{"role": "user", "content": "x"}]}', r"chats.jsonl:2: messages: assistant turn missing"),
    ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}',
     r"chats.jsonl:2: messages\[0\]\.content: must be a string, got int"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [7]}]}',
     r"chats.jsonl:2: messages\[1\]\.tool_calls\[0\]: a tool call must be an object"),
    ('{"conversation": []}', r"chats.jsonl:2: expected an object with a 'messages' list \(found \['conversation'\]\)"),
    ('{"messages": [', r"chats.jsonl:2: invalid JSON"),
])
def test_bad_records_name_file_line_and_field(tmp_path, line, match):
    good = json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]})
    (tmp_path / "chats.jsonl").write_text(good + "\n" + line + "\n")
    with pytest.raises(DataError, match=match):
        load_conversations(str(tmp_path / "chats.jsonl"))


def test_hf_dataset_with_a_messages_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>2+2=4.</think>4"}]
    datasets.Dataset.from_dict({"messages": [rows, rows]}).save_to_disk(str(tmp_path / "ds"))
    convs = load_conversations(str(tmp_path / "ds"))
    assert [c.messages[1] for c in convs] == [{"role": "assistant", "content": "4", "reasoning_content": "2+2=4."}] * 2
    bad = [{"role": "user", "content": "2+2?"}, {"role": "user", "content": "again"}]
    datasets.Dataset.from_dict({"messages": [rows, bad]}).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"bad: row 1: messages: assistant turn missing"):
        load_conversations(str(tmp_path / "bad"))


def test_packing_rejects_too_little_data():
    with pytest.raises(DataError, match="fewer than one global batch of 8"):
        PackedConversations(make_convs(2), TOK, PackingConfig(seq_len=512, batch_size=8))
