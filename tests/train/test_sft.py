"""SFT on the shared trainer. Oracles: per-token cross-entropy from a full forward's float64 log-softmax, averaged
per conversation by a Python loop (the conversation normalisation); an uninterrupted run (resume)."""

import json
import shutil

import pytest
import torch

from nemotron3 import NemotronForCausalLM, from_preset
from nemotron3.tokenizer import ByteTokenizer
from nemotron3.train.chat import PackedConversations, PackingConfig
from nemotron3.train.lm_loss import LMLoss
from nemotron3.train.sft import SFTConfig, main, train_sft
from nemotron3.train.sft_data import builtin_conversations


def test_conversation_normalisation_is_the_mean_of_conversation_means():
    torch.manual_seed(0)
    model = NemotronForCausalLM(from_preset("tiny")).eval()
    convs = builtin_conversations(40, seed=1)
    data = PackedConversations(convs, ByteTokenizer(), PackingConfig(seq_len=576, batch_size=2,
                                                                     reasoning_off_share=0.0, truncate_share=0.0))
    batch = data.next_batch()
    assert (batch["position_ids"] == 0).sum() > 2                           # packed: several conversations per row
    loss_fn = LMLoss(mtp_depths=0, normalization="sequence")
    with torch.no_grad():
        ours, _, _ = loss_fn(model, batch, loss_fn.count(batch))
        logp = model(batch["input_ids"], position_ids=batch["position_ids"]).logits.double().log_softmax(-1)
    per_conv = []
    for b in range(batch["input_ids"].shape[0]):
        starts = (batch["position_ids"][b] == 0).nonzero().squeeze(1).tolist() + [batch["input_ids"].shape[1]]
        for s, e in zip(starts, starts[1:]):
            nll = [-logp[b, t - 1, batch["labels"][b, t]] for t in range(s + 1, e) if batch["labels"][b, t] != -100]
            if nll:
                per_conv.append(torch.stack(nll).mean())
    torch.testing.assert_close(ours.double(), torch.stack(per_conv).mean(), rtol=1e-5, atol=1e-5)


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    common = dict(preset="tiny", builtin_size=60, heldout=8, seq_len=576, batch_size=2, max_steps=4, save_every=2,
                  eval_every=2, eval_batches=1, device="cpu")
    quiet = lambda *_: None                                                         # noqa: E731
    full = train_sft(SFTConfig(out=str(tmp_path / "full"), **common), log=quiet)
    train_sft(SFTConfig(out=str(tmp_path / "part"), **common), log=quiet)
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step_4")          # rerun steps 3-4 from the step-2 checkpoint
    shutil.rmtree(tmp_path / "part" / "final")
    resumed = train_sft(SFTConfig(out=str(tmp_path / "part"), resume=True, **common), log=quiet)
    a = NemotronForCausalLM.from_pretrained(full).state_dict()
    b = NemotronForCausalLM.from_pretrained(resumed).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    def losses(run):
        return [(r["step"], r["loss"], r.get("eval_loss")) for r in map(json.loads, (tmp_path / run / "metrics.jsonl")
                                                                        .read_text().splitlines())]
    assert losses("part") == losses("full") and len(losses("full")) == 4


@pytest.mark.parametrize("argv,match", [
    (["--preset", "tiny", "--loss-norm", "mean"], "--loss-norm 'mean'; use 'token' or 'conversation'"),
    (["--preset", "tiny", "--truncate-share", "1.5"], "--truncate-share 1.5 must lie in"),
    (["--model", "/no/such/dir"], "no config.json there"),
    (["--preset", "tiny", "--max-steps", "0"], "--max-steps 0 must be >= 1"),
])
def test_bad_flags_are_one_clear_error(argv, match):
    with pytest.raises(ValueError, match=match):
        main(argv)
