"""Teacher-forced log-likelihoods. Oracles: one plain forward of the whole sequence without a cache, its logits put
through a float64 log-softmax here; explicit Python sums for the running mean; synthetic curves with known
power-law parameters."""

import json

import pytest
import torch

from nemotron3 import NemotronForCausalLM, from_preset
from nemotron3.__main__ import main
from nemotron3.eval.nll import candidate_logprobs, cumulative_mean, fit_power_law, nll_curve, rank_of_first, token_nll


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return NemotronForCausalLM(from_preset("tiny")).eval()


def _full_forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1 from one uncached forward, (L-1,) float64."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()          # (L, V)
    return torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_candidate_logprobs_equal_a_full_forward_on_the_concatenation(model):
    g = torch.Generator().manual_seed(1)
    context = torch.randint(1, 256, (203,), generator=g).tolist()
    candidates = [torch.randint(1, 256, (n,), generator=g).tolist() for n in (1, 3, 7, 2)]
    got = candidate_logprobs(model, context, candidates, chunk=64)      # 4 chunks, the last one partial
    for score, cand in zip(got, candidates):
        want = _full_forward_logprobs(model, context + cand)[-len(cand):].sum()
        assert abs(float(score) - float(want)) <= 1e-4


@pytest.mark.parametrize("chunk", [37, 64, 500])
def test_token_nll_equals_a_full_forward(model, chunk):
    ids = torch.randint(1, 256, (150,), generator=torch.Generator().manual_seed(2)).tolist()
    torch.testing.assert_close(token_nll(model, ids, chunk), -_full_forward_logprobs(model, ids), atol=1e-4, rtol=0)


def test_nll_curve_is_the_mean_over_documents_and_its_running_mean(model):
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(1, 256, (90,), generator=g).tolist() for _ in range(3)]
    curve = nll_curve(model, docs, chunk=32)
    want = torch.stack([-_full_forward_logprobs(model, d) for d in docs]).mean(0)
    torch.testing.assert_close(curve, want, atol=1e-4, rtol=0)
    running = [sum(curve[:t + 1].tolist()) / (t + 1) for t in range(len(curve))]
    torch.testing.assert_close(cumulative_mean(curve), torch.tensor(running, dtype=torch.float64))


def test_rank_counts_candidates_scoring_above_the_gold():
    assert rank_of_first(torch.tensor([-1.0, -2.0, -3.0])) == 0
    assert rank_of_first(torch.tensor([-2.0, -1.0, -3.0, -0.5])) == 2


@pytest.mark.parametrize("a, b, c", [(2.5, 0.4, 1.3), (0.8, 1.2, 0.05), (4.0, 0.15, 2.0)])
def test_power_law_fit_recovers_known_parameters(a, b, c):
    t = torch.arange(1, 5001, dtype=torch.float64)
    got = fit_power_law(t, a * t ** -b + c)
    assert got == pytest.approx((a, b, c), rel=1e-4, abs=1e-5)


def test_power_law_fit_is_close_under_noise():
    t = torch.arange(1, 20001, dtype=torch.float64)
    noise = 1 + 0.003 * torch.randn(t.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a, b, c = fit_power_law(t, (2.0 * t ** -0.5 + 1.5) * noise)
    assert a == pytest.approx(2.0, rel=0.05) and b == pytest.approx(0.5, rel=0.05) and c == pytest.approx(1.5, rel=0.01)


def test_nll_cli_writes_the_curve_of_a_jsonl_file(model, tmp_path, capsys):
    model.save_pretrained(tmp_path / "m")
    docs = tmp_path / "docs.jsonl"
    texts = ["the quick brown fox " * 20, "short", "a lazy dog jumps over " * 15]
    docs.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    assert main(["eval", "nll", "--model", str(tmp_path / "m"), "--data", str(docs), "--max-len", "256",
                 "--prefill-chunk", "100", "--out", str(tmp_path / "out")]) == 0
    assert "2 documents of 256 tokens (3 read)" in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "nll.json").read_text())
    want = torch.stack([-_full_forward_logprobs(model, list(t.encode())[:256]) for t in (texts[0], texts[2])]).mean(0)
    torch.testing.assert_close(torch.tensor(saved["nll"], dtype=torch.float64), want, atol=1e-4, rtol=0)
    assert (tmp_path / "out" / "nll.png").stat().st_size > 0


def test_nll_cli_on_builtin_documents_and_on_too_short_data(model, tmp_path, capsys):
    assert main(["eval", "nll", "--preset", "tiny", "--data", "builtin", "--max-len", "600", "--max-docs", "2"]) == 0
    assert "2 documents of 600 tokens (2 read)" in capsys.readouterr().out
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    assert main(["eval", "nll", "--preset", "tiny", "--data", str(short), "--max-len", "1k"]) == 2
    assert "none of its 1 documents has 1024 tokens; lower --max-len" in capsys.readouterr().err
