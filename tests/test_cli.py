"""The command line. Oracle: the published counts (hf_nemotronh.md §9) in `info`'s output, and round trips."""

import pytest
import torch

from nemotron3 import NemotronForCausalLM, from_preset
from nemotron3.__main__ import main


def test_info_prints_plan_and_counts_without_weights(capsys):
    assert main(["info", "--preset", "super-120b-a12b"]) == 0
    out = capsys.readouterr().out
    assert "120,668,687,360" in out and "12,770,216,960" in out and "2,942,324,736" in out
    assert "40 x Mamba-2, 8 x attention, 40 x LatentMoE(l=1024)" in out


def test_info_on_a_checkpoint(tmp_path, capsys):
    NemotronForCausalLM(from_preset("tiny")).save_pretrained(tmp_path / "m")
    assert main(["info", "--model", str(tmp_path / "m")]) == 0
    assert "M*ME-M*E" in capsys.readouterr().out


def test_generate_from_a_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    model = NemotronForCausalLM(from_preset("tiny")).eval()
    model.save_pretrained(tmp_path / "m")
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt-ids", "1,2,3", "--max-new-tokens", "5"]) == 0
    got = [int(t) for t in capsys.readouterr().out.strip().split(",")]
    assert got == model.generate(torch.tensor([[1, 2, 3]]), 5)[0, 3:].tolist()
    for k in ("0", "3"):           # plain and MTP-speculative decoding print the same greedy tokens
        assert main(["generate", "--model", str(tmp_path / "m"), "--prompt-ids", "1,2,3", "--max-new-tokens", "5",
                     "--num-speculative-tokens", k]) == 0
        assert [int(t) for t in capsys.readouterr().out.strip().split(",")] == got


def test_chat_streams_reasoning_and_answer(tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    NemotronForCausalLM(from_preset("tiny")).eval().save_pretrained(tmp_path / "m")
    lines = iter(["7+5=?", "and 2+2=?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--model", str(tmp_path / "m"), "--max-new-tokens", "40", "--reasoning-budget", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("</think>") >= 2              # each turn's thought closed (budget 3 forces it)
    lines = iter(["hi", ""])
    assert main(["chat", "--model", str(tmp_path / "m"), "--max-new-tokens", "4", "--no-think"]) == 0


@pytest.mark.parametrize("argv,match", [
    (["info", "--preset", "nope"], "unknown preset"),
    (["info"], "exactly one of"),
    (["generate", "--preset", "tiny", "--prompt", ""], "prompt is empty"),
    (["generate", "--preset", "tiny", "--prompt", "x", "--temperature", "-1"], "--temperature"),
    (["generate", "--preset", "tiny", "--prompt", "x", "--top-p", "0"], "--top-p"),
    (["generate", "--preset", "tiny", "--prompt-ids", "1,a"], "comma-separated integers"),
    (["generate", "--preset", "tiny", "--prompt-ids", "1,999"], "vocab_size is 256"),
    (["generate", "--model", "/no/such/dir", "--prompt", "x"], "not a directory"),
    (["generate", "--preset", "tiny", "--prompt", "x", "--max-new-tokens", "100000"], "max_position_embeddings"),
    (["generate", "--preset", "tiny", "--prompt", "x", "--min-p", "2"], "--min-p"),
    (["generate", "--preset", "tiny", "--prompt", "x", "--num-speculative-tokens", "-1"], "--num-speculative"),
    (["chat", "--preset", "tiny", "--reasoning-budget", "-2"], "--reasoning-budget"),
    (["generate", "--preset", "tiny", "--prompt", "x", "--max-len", "1"], "--max-len 1 must be >= 2"),
])
def test_bad_input_is_one_clear_line(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and err.count("\n") == 1


def test_demo_pretrains_fine_tunes_evaluates_and_reports(tmp_path, capsys):
    small = ["--max-steps", "4", "--sft-steps", "2", "--eval-conversations", "6"]
    assert main(["demo", "--out", str(tmp_path / "demo"), "--rl-steps", "1"] + small) == 0
    out = capsys.readouterr().out
    for text in ("parameters active per token", "1. pretraining", "MTP depth 2 accuracy", "2. SFT",
                 "held-out assistant-token loss", "3. RL", "held-out reward math_short", "thinking on", "thinking off", "budget 4", "budget 8",
                 "well-formed call with the right arguments", "transcripts", "whole demo", "training.png"):
        assert text in out, text
    for phase in ("pretrain", "sft", "rl", ""):
        assert (tmp_path / "demo" / phase / "final" / "model.safetensors").exists(), phase
    assert main(["demo", "--out", str(tmp_path / "demo"), "--rl-steps", "0"] + small) == 0   # replaces its own earlier run
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "other")] + small) == 2     # never deletes a non-run
    assert (tmp_path / "other" / "precious.txt").exists()


def test_generate_and_chat_on_a_transformers_saved_directory(tmp_path, capsys, monkeypatch):
    """A NemotronH directory written by transformers itself, with a tokenizer.json and a chat template beside it."""
    import transformers

    from tests.test_tokenizer import write_test_tokenizer
    torch.manual_seed(0)
    NemotronForCausalLM(from_preset("tiny", vocab_size=300, num_nextn_predict_layers=0)).save_pretrained(
        tmp_path / "ours")
    transformers.NemotronHForCausalLM.from_pretrained(tmp_path / "ours").save_pretrained(tmp_path / "hf")
    write_test_tokenizer(tmp_path / "hf")
    tmp_path = tmp_path / "hf"
    assert main(["generate", "--model", str(tmp_path), "--prompt", "The red fox", "--max-new-tokens", "6"]) == 0
    capsys.readouterr()
    lines = iter(["12+30?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--model", str(tmp_path), "--max-new-tokens", "30", "--reasoning-budget", "2"]) == 0
    assert "</think>" in capsys.readouterr().out
