"""The shared trainer and its LM loss. Oracles: the model's own mean losses on the whole batch run at once (for
gradient accumulation, whatever the valid-target counts of the micro-batches), each conversation run alone (for
per-conversation normalisation of a packed row), and the saved model / tokenizer a run starts from."""

import json
import os

import torch

from nemotron3 import NemotronForCausalLM, from_preset
from nemotron3.train.balance import sequence_aux_loss
from nemotron3.train.lm_loss import LMLoss
from nemotron3.train.trainer import Trainer, TrainerConfig
from tests.hf_utils import randomize_

D, LAMBDA, AUX = 2, 0.3, 1e-2


def tiny_model():
    torch.manual_seed(0)
    return randomize_(NemotronForCausalLM(from_preset("tiny", chunk_size=4)), scale=0.1)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulating_two_half_batches_gives_the_whole_batch_gradient_and_metrics():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (4, 12), generator=g)
    labels = ids.clone()
    labels[:2, :9] = -100                        # the first micro-batch has far fewer valid targets
    labels[3, 4] = -100
    out = model(ids, labels=labels, mtp_depths=D, return_router=True)
    aux = sum(sequence_aux_loss(r.scores_TE, 4, r.ids_TK.shape[1], AUX) for r in out.router.values())
    (out.loss + LAMBDA / D * sum(out.mtp_losses) + aux).backward()
    want = grads(model)
    model.zero_grad()

    cfg = TrainerConfig(out="unused", grad_accum=2, batch_size=2, mtp_depths=D, mtp_lambda=LAMBDA, aux_coeff=AUX)
    trainer = Trainer(cfg, model, LMLoss(D, LAMBDA, AUX), log=lambda *_: None)
    halves = [{"input_ids": ids[s], "labels": labels[s]} for s in (slice(0, 2), slice(2, 4))]
    metrics = trainer.accumulate_gradients(halves)
    got = grads(model)
    assert got.keys() == want.keys()
    for n in want:
        # fp32, summed in another order: gaps of ~1e-6 of the tensor's scale (a wrong normalisation gives ~1e-1)
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5 * want[n].abs().max().item(), msg=n)
    assert abs(metrics["loss"] - out.loss.item()) < 1e-5
    for k in range(D):
        assert abs(metrics[f"mtp{k + 1}_loss"] - out.mtp_losses[k].item()) < 1e-5
        assert abs(metrics[f"mtp{k + 1}_accuracy"] - out.mtp_accuracies[k].item()) < 1e-6
    model.zero_grad()
    for h in halves:                                  # averaging per-micro-batch means instead: visibly wrong
        (model(h["input_ids"], labels=h["labels"]).loss / 2).backward()
    naive, exact = model.lm_head.weight.grad, want["lm_head.weight"]
    assert (naive - exact).norm() > 0.05 * exact.norm()


def test_per_conversation_normalisation_of_a_packed_row_averages_each_conversation_mean():
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    lengths, prompt = [6, 13, 9], 3                     # the first 3 tokens of each conversation are prompt
    convs = [torch.randint(0, 256, (1, n), generator=g) for n in lengths]
    conv_labels = [c.clone() for c in convs]
    for lab in conv_labels:
        lab[:, :prompt] = -100

    want_loss = 0
    for c, lab in zip(convs, conv_labels):
        out = model(c, labels=lab, mtp_depths=D)
        want_loss = want_loss + (out.loss + LAMBDA / D * sum(out.mtp_losses)) / len(convs)
    want_loss.backward()
    want = grads(model)
    model.zero_grad()

    batch = {"input_ids": torch.cat(convs, 1), "labels": torch.cat(conv_labels, 1),
             "position_ids": torch.cat([torch.arange(n) for n in lengths])[None]}
    cfg = TrainerConfig(out="unused", batch_size=1, mtp_depths=D, mtp_lambda=LAMBDA, aux_coeff=0.0,
                        loss_normalization="sequence")
    trainer = Trainer(cfg, model, LMLoss(D, LAMBDA, 0.0, "sequence"), log=lambda *_: None)
    metrics = trainer.accumulate_gradients([batch])
    assert abs(metrics["total_loss"] - want_loss.item()) < 1e-5
    for n, grad in grads(model).items():
        torch.testing.assert_close(grad, want[n], rtol=1e-4, atol=1e-5 * want[n].abs().max().item(), msg=n)


def test_training_starts_from_a_model_directory_with_its_tokenizer(tmp_path):
    tokenizers = __import__("pytest").importorskip("tokenizers")
    from nemotron3.__main__ import main
    from nemotron3.tokenizer import HFTokenizer
    start = tmp_path / "start"
    model = NemotronForCausalLM(from_preset("tiny", vocab_size=300))
    model.save_pretrained(start)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["the red fox sees the old tree"] * 50, tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|end|>", "<unk>"]))
    tok.save(str(start / "tokenizer.json"))
    (start / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>"}))
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"the red fox sees the old tree {i}"}) + "\n" for i in range(200)))
    out = tmp_path / "run"
    assert main(["train", "--model", str(start), "--data", str(docs), "--out", str(out), "--seq-len", "16",
                 "--batch-size", "2", "--max-steps", "2", "--save-every", "2", "--lr", "1e-9", "--warmup-steps", "0",
                 "--eval-every", "2", "--no-cross-document"]) == 0
    tokens = __import__("numpy").fromfile(out / "tokens.bin", dtype="uint16")
    ref = HFTokenizer(str(start / "tokenizer.json"))
    first = ref.encode("the red fox sees the old tree 0") + [ref.eos_token_id]
    assert tokens[:len(first)].tolist() == first and len(first) < 20       # its tokenizer, not 32 bytes
    trained = NemotronForCausalLM.from_pretrained(out / "final")
    torch.testing.assert_close(trained.lm_head.weight, model.lm_head.weight, rtol=0, atol=1e-6)   # lr 1e-9
    assert os.path.exists(out / "final" / "tokenizer.json")


def test_document_positions_restart_after_each_end_of_document_token():
    from nemotron3.train.data import document_position_ids
    ids = torch.tensor([[5, 0, 3, 4, 0, 0, 7], [1, 2, 3, 0, 9, 9, 9]])
    assert document_position_ids(ids, eos_id=0).tolist() == [[0, 1, 0, 1, 2, 0, 0], [0, 1, 2, 3, 0, 1, 2]]


def test_any_iterator_of_packed_dict_batches_trains_and_saves(tmp_path):
    """What the SFT command does: packed rows with per-label weights, sequence-mean loss, MTP on."""
    g = torch.Generator().manual_seed(2)

    def packed_batch():
        lengths = [7, 12, 5]
        ids = torch.randint(1, 256, (2, sum(lengths)), generator=g)
        labels = ids.clone()
        labels[:, :3] = -100                                   # a prompt
        position_ids = torch.cat([torch.arange(n) for n in lengths]).expand(2, -1)
        return {"input_ids": ids, "labels": labels, "position_ids": position_ids,
                "loss_weights": torch.rand(ids.shape, generator=g)}

    cfg = TrainerConfig(out=str(tmp_path), max_steps=2, save_every=2, eval_every=2, batch_size=2, grad_accum=2,
                        loss_normalization="sequence")
    model = NemotronForCausalLM(from_preset("tiny")).train()
    trainer = Trainer(cfg, model, LMLoss.from_config(cfg, model), log=lambda *_: None)
    held_out = [packed_batch()]
    final = trainer.train(iter([packed_batch() for _ in range(4)]), lambda: held_out)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["eval_mtp2_accuracy"] >= 0
    assert all(torch.isfinite(torch.tensor(r["mtp1_loss"])) for r in rows)
    assert NemotronForCausalLM.from_pretrained(final).config.vocab_size == 256


def test_a_sharded_run_from_a_model_directory_keeps_its_draft_vocabulary(tmp_path, monkeypatch):
    """Under torchrun (WORLD_SIZE > 1, FSDP2 on) --model builds the model empty and fills it shard by shard; the
    directory's draft vocabulary (draft_vocab.json) must come along, as from_pretrained brings it, else every model
    the run saves loses it."""
    from nemotron3.train.trainer import build_model, shards_weights
    start = tmp_path / "start"
    model = NemotronForCausalLM(from_preset("tiny"))
    model.draft_vocab = torch.tensor([7, 3, 11])
    model.save_pretrained(start)
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = TrainerConfig(model=str(start), out=str(tmp_path / "run"))
    assert shards_weights(cfg)
    built, _ = build_model(cfg)
    assert built.lm_head.weight.is_meta and built.draft_vocab.tolist() == [7, 3, 11]
