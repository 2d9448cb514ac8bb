"""WSD schedule and expert balancing. Oracles: the formulas in nemotron3_spec.md §5.1/§5.2 evaluated by hand, and a
per-sequence float64 loop for the aux loss."""

import math

import pytest
import torch

from nemotron3.train.balance import expert_counts, load_stats, sequence_aux_loss, update_expert_bias
from nemotron3.train.schedule import WSDSchedule


def test_wsd_phases_and_end_points():
    s = WSDSchedule(peak_lr=1e-3, total_steps=100, warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.01)
    assert s(0) == pytest.approx(1e-4) and s(9) == pytest.approx(1e-3)
    assert all(s(t) == 1e-3 for t in range(10, 80))
    assert s(80) == pytest.approx(1e-3) and s(100) == pytest.approx(1e-5)
    p = (90 - 80) / 20                                                        # minus-sqrt halfway through decay
    assert s(90) == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 - math.sqrt(p)))
    lrs = [s(t) for t in range(80, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


@pytest.mark.parametrize("shape,mid", [("linear", 0.5), ("cosine", 0.5), ("minus_sqrt", 1 - math.sqrt(0.5))])
def test_wsd_decay_shapes(shape, mid):
    s = WSDSchedule(peak_lr=1.0, total_steps=10, warmup_steps=0, decay_fraction=1.0, min_lr_ratio=0.0,
                    decay_shape=shape)
    assert s(5) == pytest.approx(mid)


@pytest.mark.parametrize("kw,match", [(dict(peak_lr=0), "peak_lr"), (dict(warmup_steps=2000), "warmup_steps"),
                                      (dict(decay_shape="exp"), "decay_shape"),
                                      (dict(warmup_steps=900), "runs into the decay")])
def test_wsd_rejects_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        WSDSchedule(**kw)


def test_bias_moves_towards_balance():
    bias = torch.zeros(4)
    update_expert_bias(bias, torch.tensor([10, 0, 5, 5]), rate=1e-3)
    assert torch.equal(bias, torch.tensor([-1e-3, 1e-3, 0.0, 0.0]))


def test_sequence_aux_loss_matches_loop_and_is_coeff_when_uniform():
    torch.manual_seed(0)
    b, T, E, K = 3, 5, 6, 2
    scores = torch.rand(b * T, E, dtype=torch.float64, requires_grad=True)
    got = sequence_aux_loss(scores, b, K, coeff=1e-4)
    ref = 0.0
    for i in range(b):
        s = scores[i * T:(i + 1) * T].detach()
        s_hat = s / s.sum(-1, keepdim=True)
        f = torch.zeros(E, dtype=torch.float64)
        for t in range(T):
            for e in s_hat[t].argsort(descending=True)[:K]:
                f[e] += 1 / (T * K)
        ref += 1e-4 * E * float((f * s_hat.mean(0)).sum()) / b
    assert got.item() == pytest.approx(ref, rel=1e-9)
    got.backward()
    assert scores.grad.abs().sum() > 0
    assert sequence_aux_loss(torch.full((T * E, E), 0.5), T * E, K).item() == pytest.approx(1e-4)   # uniform


def test_load_stats():
    st = load_stats(expert_counts(torch.tensor([[0, 1], [0, 1], [2, 0]]), 4))
    assert st["dead_experts"] == 1 and st["max_over_mean"] == pytest.approx(3 / 1.5)
    assert load_stats(torch.tensor([5, 5, 5, 5]))["entropy"] == pytest.approx(1.0)
