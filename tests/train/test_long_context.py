"""The long-context training stage: the --mix data, activation checkpointing, the constant learning rate.
Oracles: Python's counting of row classes against the binomial spread of the requested shares; a scan of each row
for its end-of-document tokens (where positions must restart); the documents written out by long_docs.long_document
(where rows must start); the same batch's gradients, losses and expert counts computed by plain autograd without
checkpointing; the learning rate written in metrics.jsonl."""

import json
import math

import pytest
import torch

from nemotron3 import NemotronForCausalLM, from_preset
from nemotron3.tokenizer import ByteTokenizer
from nemotron3.train.parallelize import parallelize
from nemotron3.train.data import DataError
from nemotron3.train.lm_loss import LMLoss
from nemotron3.train.long_context import MixedLengthRows, parse_mix
from nemotron3.train.long_docs import long_document, long_document_parts
from nemotron3.train.pretrain import TrainConfig, train
from tests.hf_utils import randomize_

BYTES = ByteTokenizer()
MIX = [(3072, 0.25), (768, 0.75)]


def test_parse_mix_reads_lengths_and_shares():
    assert parse_mix("65536:0.2,4096:0.8") == [(65536, 0.2), (4096, 0.8)]


@pytest.mark.parametrize("spec,match", [("65536-0.2", "LENGTH:SHARE"), ("4096:0.5,4096:0.5", "distinct"),
                                        ("65536:0.3,4096:0.8", "sum to 1"), ("8:1", ">= 16"),
                                        ("4096:x", "LENGTH:SHARE"), ("4096:0,2048:1", "> 0")])
def test_bad_mix_specs_say_what_to_write(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_mix(spec)


def test_rows_come_in_the_requested_ratio_and_shape():
    data = MixedLengthRows(BYTES, MIX, batch_size=8)
    batches = [next(data) for _ in range(50)]                               # 400 rows
    assert all(b["input_ids"].shape == (8, 3072) for b in batches)
    share = data.classes.count(3072) / len(data.classes)
    sd = math.sqrt(0.25 * 0.75 / len(data.classes))
    assert abs(share - 0.25) < 4 * sd, share


def test_documents_stay_apart_short_rows_pack_many_long_rows_one():
    data = MixedLengthRows(BYTES, MIX, batch_size=6, seed=1)
    for _ in range(4):
        batch = next(data)
        for ids, pos, cls in zip(batch["input_ids"].tolist(), batch["position_ids"].tolist(), data.classes[-6:]):
            eos_at = [t for t, x in enumerate(ids[:-1]) if x == BYTES.eos_token_id]
            assert [t for t in range(1, len(ids)) if pos[t] == 0] == [t + 1 for t in eos_at]   # restart after eos
            assert all(pos[t] == pos[t - 1] + 1 for t in range(1, len(ids)) if pos[t] != 0)
            if cls == 768:
                assert len(eos_at) >= 3072 // 768 - 1            # ~4 short documents of ~768 tokens
            else:
                assert len(eos_at) <= 1                          # one long document (and a piece of the next)
    assert set(data.classes) == {768, 3072}


def test_mix_data_resumes_where_it_stopped():
    a = MixedLengthRows(BYTES, MIX, batch_size=3, seed=2)
    for _ in range(3):
        next(a)
    b = MixedLengthRows(BYTES, MIX, batch_size=3, seed=2)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(2):
        x, y = next(a), next(b)
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_too_short_mix_lengths_are_refused_with_the_minimum():
    with pytest.raises(DataError, match=">= 768"):
        MixedLengthRows(BYTES, [(4096, 0.5), (256, 0.5)], batch_size=1)


def test_activation_checkpointing_gives_the_plain_gradients_losses_and_expert_counts():
    def run(ckpt):
        torch.manual_seed(0)
        model = randomize_(NemotronForCausalLM(from_preset("tiny", chunk_size=4)), scale=0.1).train()
        if ckpt:
            parallelize(model, world=1, act_ckpt=True)                     # every block and the MTP module
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 256, (2, 24), generator=g)
        pos = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, 24).contiguous()
        batch = {"input_ids": ids, "labels": ids, "position_ids": pos}
        loss_fn = LMLoss(mtp_depths=2, mtp_lambda=0.3, aux_coeff=1e-2)
        loss, metrics, _ = loss_fn(model, batch, loss_fn.count(batch))
        loss.backward()
        counts = {n: b.clone() for n, b in model.named_buffers() if n.endswith("tokens_per_expert")}
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, counts
    plain_loss, plain_grads, plain_counts = run(False)
    ckpt_loss, ckpt_grads, ckpt_counts = run(True)
    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=0, atol=1e-6)
    assert ckpt_grads.keys() == plain_grads.keys()
    for n in plain_grads:
        torch.testing.assert_close(ckpt_grads[n], plain_grads[n], rtol=1e-5, atol=1e-6, msg=n)
    assert all(torch.equal(ckpt_counts[n], plain_counts[n]) for n in plain_counts) and plain_counts


def test_train_mix_runs_with_a_constant_lr_and_act_ckpt(tmp_path):
    train(TrainConfig(out=str(tmp_path), mix="1536:0.5,768:0.5", batch_size=2, max_steps=3, save_every=3,
                      eval_every=3, eval_batches=1, lr=2e-3, constant_lr=True, act_ckpt=True, mtp_depths=1),
          log=lambda *_: None)
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["lr"] for r in records] == [2e-3] * 3
    assert all(r["tokens_per_s"] > 0 and math.isfinite(r["loss"]) for r in records) and "eval_loss" in records[-1]
    assert (tmp_path / "final" / "config.json").exists()


def test_every_row_starts_with_a_whole_document():
    # 1024-token rows of ~1000-token documents: row i is document i from its first token (the oracle: the document
    # written out by long_docs.long_document, 1024 - 64 prompt tokens), and its answer line lies inside the row
    data = MixedLengthRows(BYTES, [(1024, 1.0)], batch_size=2, seed=3)
    rows = [row for _ in range(3) for row in next(data)["input_ids"].tolist()]
    for i, row in enumerate(rows):
        doc = BYTES.encode(long_document(BYTES, 1024 - 64, i, seed=3)) + [BYTES.eos_token_id]
        assert len(doc) <= 1024 and row[:len(doc)] == doc, i


def test_answer_weight_weighs_exactly_each_documents_answer_tokens():
    # oracle: the answer line long_docs.long_document_parts writes after the prompt, found by its token positions
    w = 20.0
    data = MixedLengthRows(BYTES, [(1024, 1.0)], batch_size=2, seed=4, answer_weight=w)
    batch = next(data)
    for i in range(2):
        prompt, answer = long_document_parts(BYTES, 1024 - 64, i, seed=4)
        start, end = len(BYTES.encode(prompt)), len(BYTES.encode(prompt + answer))
        expected = torch.ones(1024)
        expected[start:end] = w
        torch.testing.assert_close(batch["loss_weights"][i], expected, rtol=0, atol=0)
    assert "loss_weights" not in next(MixedLengthRows(BYTES, [(1024, 1.0)], batch_size=1))


def test_a_non_positive_answer_weight_is_refused():
    with pytest.raises(ValueError, match="answer-weight"):
        MixedLengthRows(BYTES, [(1024, 1.0)], batch_size=1, answer_weight=0.0)


def test_long_tasks_shorten_the_shortest_mix_length_and_choose_the_documents():
    # niah_single_1 and vt need prompts of 432 tokens (long_docs.MIN_PROMPT_TOKENS) + 64 for the answer line
    tasks = ("niah_single_1", "vt")
    data = MixedLengthRows(BYTES, [(496, 1.0)], batch_size=8, seed=6, tasks=tasks)
    docs = [bytes(row).split(b"\x00")[0].decode() for _ in range(3) for row in next(data)["input_ids"].tolist()]
    assert all(("VAR " in d) != ("special magic numbers" in d) for d in docs) and any("VAR " in d for d in docs)
    with pytest.raises(DataError, match=">= 496"):
        MixedLengthRows(BYTES, [(480, 1.0)], batch_size=1, tasks=tasks)
    with pytest.raises(ValueError, match="choose one or more of"):
        MixedLengthRows(BYTES, [(1024, 1.0)], batch_size=1, tasks=("fwe",))
