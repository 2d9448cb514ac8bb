"""The training loop. Oracles: an uninterrupted run (for resume after a real SIGKILL), the loss going down on the
built-in corpus, and hand-made divergence."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from nemotron3.__main__ import main
from nemotron3.train.pretrain import TrainConfig, train

ARGS = ["--preset", "tiny", "--seq-len", "64", "--batch-size", "4", "--eval-every", "5", "--train-tokens", "60000"]


def weights(run_dir):
    return load_file(os.path.join(run_dir, "final", "model.safetensors"))


def test_killed_run_resumes_bit_for_bit(tmp_path):
    steps = ["--max-steps", "40", "--save-every", "4"]
    assert main(["train", "--out", str(tmp_path / "a")] + ARGS + steps) == 0
    cmd = [sys.executable, "-m", "nemotron3", "train", "--out", str(tmp_path / "b")] + ARGS + steps
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not os.path.exists(tmp_path / "b" / "checkpoints" / "step_8" / "trainer_state.json"):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(tmp_path / "b" / "final")                     # really killed mid-run
    assert main(["train", "--out", str(tmp_path / "b"), "--resume"] + ARGS + steps) == 0
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logged = [json.loads(line)["step"] for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert logged == list(range(1, 41))                                     # no step logged twice
    assert len(os.listdir(tmp_path / "b" / "checkpoints")) == 2              # keep_last


def test_loss_goes_down_and_metrics_are_logged(tmp_path):
    train(TrainConfig(out=str(tmp_path), max_steps=40, save_every=40, seq_len=64, batch_size=8, eval_every=20,
                      train_tokens=60000), log=lambda *_: None)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows[-1]["eval_loss"] < 0.7 * rows[0]["loss"]
    for key in ("mtp1_loss", "mtp2_accuracy", "moe3_max_over_mean", "moe7_dead_experts", "eval_mtp1_accuracy",
                "lr", "grad_norm", "tokens_per_s"):
        assert key in rows[-1], key


def nan_from_call(monkeypatch, n):
    """Make the n-th micro-batch loss NaN (a hand-made divergence)."""
    from nemotron3.train.lm_loss import LMLoss
    real, calls = LMLoss.__call__, []

    def poisoned(self, model, batch, totals):
        loss, metrics, out = real(self, model, batch, totals)
        if model.training:
            calls.append(1)
        if len(calls) >= n:
            loss, metrics["total_loss"] = loss * float("nan"), metrics["total_loss"] * float("nan")
        return loss, metrics, out
    monkeypatch.setattr(LMLoss, "__call__", poisoned)


def test_divergence_stops_with_the_last_good_checkpoint(tmp_path, monkeypatch):
    nan_from_call(monkeypatch, 4)
    with pytest.raises(FloatingPointError, match="step 3: loss nan.*Last good checkpoint: .*step_2"):
        train(TrainConfig(out=str(tmp_path), max_steps=6, save_every=2, seq_len=32, batch_size=2,
                          train_tokens=20000), log=lambda *_: None)
    assert not os.path.exists(tmp_path / "final") and not os.path.exists(tmp_path / "checkpoints" / "step_4")
    good = load_file(tmp_path / "checkpoints" / "step_2" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in good.values())


def test_skip_mode_drops_bad_steps_and_finishes(tmp_path, monkeypatch):
    nan_from_call(monkeypatch, 4)
    train(TrainConfig(out=str(tmp_path), max_steps=6, save_every=3, seq_len=32, batch_size=2, on_nan="skip",
                      train_tokens=20000), log=lambda *_: None)
    assert all(torch.isfinite(t).all() for t in weights(tmp_path).values())


@pytest.mark.parametrize("argv,match", [
    (["--precision", "fp8"], "--precision fp8"),
    (["--max-steps", "0"], "--max-steps 0 must be >= 1"),
    (["--resume"], "no checkpoint"),
    (["--data", "/no/such.jsonl"], "no such file"),
])
def test_bad_train_flags_are_one_line(tmp_path, capsys, argv, match):
    assert main(["train", "--out", str(tmp_path)] + ARGS + argv) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_help_lists_every_flag_with_its_docstring(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "minus-sqrt to 1%" in out                   # a '%' in a docstring broke --help
    for flag in ("--model", "--no-cross-document", "--loss-normalization", "--grad-accum", "--seq-len"):
        assert flag in out, flag
