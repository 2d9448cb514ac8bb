"""SFT on the shared trainer. Oracles: per-token cross-entropy from a full forward's float64 log-softmax, averaged
per conversation by a Python loop (the conversation normalisation); an uninterrupted run (resume after a real
SIGKILL); hand-written bad records and flags (one clear error line)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from nemotron3 import NemotronForCausalLM, from_preset
from nemotron3.__main__ import main as cli
from nemotron3.tokenizer import ByteTokenizer
from nemotron3.train.chat import PackedConversations, PackingConfig
from nemotron3.train.lm_loss import LMLoss
from nemotron3.train.sft import main
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


SFT_ARGS = ["--preset", "tiny", "--builtin-size", "60", "--heldout", "8", "--seq-len", "576", "--batch-size", "2",
            "--max-steps", "10", "--save-every", "2", "--eval-every", "5", "--eval-batches", "1", "--device", "cpu"]


def test_killed_run_resumes_bit_for_bit(tmp_path):
    assert cli(["sft", "--out", str(tmp_path / "full")] + SFT_ARGS) == 0
    cmd = [sys.executable, "-m", "nemotron3", "sft", "--out", str(tmp_path / "part")] + SFT_ARGS
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not os.path.exists(tmp_path / "part" / "checkpoints" / "step_4" / "trainer_state.json"):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(tmp_path / "part" / "final")                  # really killed mid-run
    assert cli(["sft", "--out", str(tmp_path / "part"), "--resume"] + SFT_ARGS) == 0
    a = NemotronForCausalLM.from_pretrained(tmp_path / "full" / "final").state_dict()
    b = NemotronForCausalLM.from_pretrained(tmp_path / "part" / "final").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def losses(run):
        return [(r["step"], r["loss"], r.get("eval_loss")) for r in map(json.loads, (tmp_path / run / "metrics.jsonl")
                                                                        .read_text().splitlines())]
    assert losses("part") == losses("full") and [s for s, _, _ in losses("full")] == list(range(1, 11))


def test_bad_data_file_is_one_line_naming_file_line_and_field(tmp_path, capsys):
    good = json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]})
    (tmp_path / "chats.jsonl").write_text(good + "\n" + '{"messages": [{"role": "bot", "content": "x"}]}\n')
    assert cli(["sft", "--preset", "tiny", "--data", str(tmp_path / "chats.jsonl"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "chats.jsonl:2: messages[0].role: unknown role 'bot'" in err and "Traceback" not in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("argv,match", [
    (["--preset", "tiny", "--loss-norm", "mean"], "--loss-norm 'mean'; use 'token' or 'conversation'"),
    (["--preset", "tiny", "--truncate-share", "1.5"], "--truncate-share 1.5 must lie in"),
    (["--model", "/no/such/dir"], "no config.json there"),
    (["--preset", "tiny", "--max-steps", "0"], "--max-steps 0 must be >= 1"),
    (["--preset", "tiny", "--data", "chats.csv"], "chats.csv: conversations must be a .jsonl file"),
    (["--preset", "tiny", "--data", "/no/such.jsonl"], "/no/such.jsonl: no such file"),
])
def test_bad_flags_are_one_clear_error(argv, match):
    with pytest.raises(ValueError, match=match):
        main(argv)
