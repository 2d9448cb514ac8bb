"""GRPO advantages and loss. Oracle: the float64 per-token loops of tests/reference/grpo.py (values and gradients),
and hand-computed values for the degenerate groups."""

import pytest
import torch

from nemotron3.rl import group_advantages, grpo_loss
from tests.reference.grpo import advantages_ref, grpo_loss_ref


@pytest.mark.parametrize("G", [3, 4, 16])
@pytest.mark.parametrize("normalize", [True, False])
def test_group_advantages_match_float64_loop(G, normalize):
    torch.manual_seed(0)
    r = torch.randn(5, G, dtype=torch.float64)
    r[1] = (torch.rand(G) > 0.5).double()                     # binary rewards, as the verifiers give
    r[2] = 1.0
    r[2, 0] = 0.0                                              # one sample differs: its others all equal (s_0 = 0)
    torch.testing.assert_close(group_advantages(r, normalize=normalize), advantages_ref(r, normalize),
                               rtol=1e-12, atol=1e-12)


def test_group_advantages_all_equal_rewards_give_zero_and_pair_gives_difference():
    assert group_advantages(torch.ones(2, 4)).abs().max().item() == 0.0
    # G = 2: the std of one other sample is undefined, so the plain difference is used
    torch.testing.assert_close(group_advantages(torch.tensor([[1.0, 0.0]])), torch.tensor([[1.0, -1.0]]))
    # the lone success among 4 failures: others are all 0, so s = 0 and A = 1 - 0 = 1 (no 1e6 blow-up)
    a = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0]]))
    assert a[0, 0].item() == pytest.approx(1.0)


def test_group_advantages_reject_single_sample():
    with pytest.raises(ValueError, match="at least 2 samples"):
        group_advantages(torch.ones(3, 1))


def _batch(B=6, T=9, spread=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    gen = old + torch.randn(B, T, generator=g, dtype=torch.float64) * spread   # some w outside [0.5, 5]
    gen[0] = old[0] - 2.5                                                      # sequence 0: err > 2, dropped
    logp = (old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3).requires_grad_(True)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) > 0.25).double()
    mask[-1] = 0                                                                # an empty sequence
    ref = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2
    return logp, old, gen, adv, mask, ref


@pytest.mark.parametrize("is_mode", ["none", "raw", "tis", "mask"])
def test_grpo_loss_and_grad_match_float64_loop(is_mode):
    logp, old, gen, adv, mask, ref = _batch()
    loss, stats = grpo_loss(logp, old, gen, adv, mask, is_mode=is_mode, kl_beta=0.05, ref_logp=ref)
    (grad,) = torch.autograd.grad(loss, logp)
    logp2 = logp.detach().clone().requires_grad_(True)
    ref_loss, n_masked, n_dropped = grpo_loss_ref(logp2, old, gen, adv, mask, 0.2, 0.28, is_mode, 0.5, 5.0, 2.0,
                                                  beta=0.05, ref=ref)
    (ref_grad,) = torch.autograd.grad(ref_loss, logp2)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    assert stats["is_masked_frac"] == pytest.approx(n_masked / mask.sum().item())
    assert stats["seq_dropped_frac"] == pytest.approx(n_dropped / 5)            # 5 non-empty sequences
    assert n_dropped >= 1
    if is_mode in ("mask", "tis"):
        assert n_masked > 0                                                      # the branch was exercised


def test_grpo_loss_per_token_advantages_and_overlong_filter_match_loop():
    logp, old, gen, _, mask, _ = _batch(seed=1, spread=0.1)
    adv = torch.randn(mask.shape, dtype=torch.float64)
    truncated = torch.tensor([False, True, False, False, True, False])
    loss, _ = grpo_loss(logp, old, gen, adv, mask, truncated=truncated)
    ref, _, _ = grpo_loss_ref(logp, old, gen, adv, mask, 0.2, 0.28, "mask", 0.5, 5.0, 2.0, truncated=truncated)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)


def test_on_policy_ratio_is_one_with_advantage_gradient():
    """With logp == old (one update per rollout) and no mismatch, L = -sum m A / sum m and dL/dlogp = -m A / sum m."""
    old = -torch.rand(3, 4, dtype=torch.float64)
    logp = old.clone().requires_grad_(True)
    adv = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    mask = torch.ones(3, 4, dtype=torch.float64)
    loss, stats = grpo_loss(logp, old, old, adv, mask)
    loss.backward()
    assert loss.item() == pytest.approx(-adv.mean().item())
    torch.testing.assert_close(logp.grad, -adv[:, None].expand(3, 4) / 12)
    assert stats["logp_diff_max"] == 0.0 and stats["clip_frac"] == 0.0


def test_micro_batches_with_global_token_count_sum_to_full_batch_loss():
    logp, old, gen, adv, mask, _ = _batch(seed=2, spread=0.1)
    full, stats = grpo_loss(logp, old, gen, adv, mask)
    # the global denominator counts the tokens that survive the sequence filter, as the whole-batch call does
    parts = [grpo_loss(logp[s], old[s], gen[s], adv[s], mask[s], token_count=stats["tokens"])[0]
             for s in (slice(0, 2), slice(2, 6))]
    torch.testing.assert_close(sum(parts), full)


def test_grpo_loss_rejects_bad_settings():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="is_mode='icepop' is unknown"):
        grpo_loss(x, x, x, torch.zeros(2), x, is_mode="icepop")
    with pytest.raises(ValueError, match="needs ref_logp"):
        grpo_loss(x, x, x, torch.zeros(2), x, kl_beta=0.1)
    with pytest.raises(ValueError, match="must all be"):
        grpo_loss(x, x, torch.zeros(2, 4), torch.zeros(2), x)
