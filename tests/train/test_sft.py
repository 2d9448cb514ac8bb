"""SFT loop. Oracles: the model's own fused token-mean cross-entropy (for the per-conversation loss when a batch
holds one conversation per row and one row, where both normalisations agree), and an uninterrupted run for resume."""

import json
import shutil

import pytest
import torch

from nemotron3 import NemotronForCausalLM, from_preset
from nemotron3.tokenizer import ByteTokenizer
from nemotron3.train.chat import PackedConversations, PackingConfig
from nemotron3.train.sft import SFTConfig, main, sft_loss, train_sft
from nemotron3.train.sft_data import builtin_conversations


def test_per_conversation_loss_equals_the_fused_token_mean_for_one_conversation():
    torch.manual_seed(0)
    model = NemotronForCausalLM(from_preset("tiny"))
    convs = builtin_conversations(12, seed=1)
    cfg = PackingConfig(seq_len=576, batch_size=1, pack_window=1, reasoning_off_share=0.0, truncate_share=0.0)
    tok = ByteTokenizer()
    by_conv = PackedConversations(convs, tok, PackingConfig(**{**cfg.__dict__, "loss_norm": "conversation"}))
    by_token = PackedConversations(convs, tok, cfg)
    row = [by_conv.rows(0)[0][:1]]                                  # one conversation alone in its row
    sft = SFTConfig(preset="tiny", mtp_depths=0)
    _, conv_loss = sft_loss(model, by_conv.collate(row), sft, 0, packed=False)
    _, token_loss = sft_loss(model, by_token.collate(row), sft, 0, packed=False)
    torch.testing.assert_close(conv_loss, token_loss, rtol=1e-5, atol=1e-5)


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    common = dict(preset="tiny", builtin_size=60, heldout=8, seq_len=576, batch_size=2, max_steps=4, save_every=2,
                  eval_every=2, device="cpu")
    full = train_sft(SFTConfig(out=str(tmp_path / "full"), **common), log=lambda *_: None)
    train_sft(SFTConfig(out=str(tmp_path / "part"), **common), log=lambda *_: None)
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step_4")          # rerun steps 3-4 from the step-2 checkpoint
    shutil.rmtree(tmp_path / "part" / "final")
    resumed = train_sft(SFTConfig(out=str(tmp_path / "part"), resume=True, **common), log=lambda *_: None)
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
    (["--preset", "tiny", "--model", "x"], "exactly one of --model DIR"),
    (["--preset", "tiny", "--max-steps", "0"], "--max-steps 0 must be >= 1"),
])
def test_bad_flags_are_one_clear_error(argv, match):
    with pytest.raises(ValueError, match=match):
        main(argv)
