"""Fused linear cross-entropy. Oracle: torch's F.cross_entropy / log_softmax on materialised float64 logits."""

import pytest
import torch
import torch.nn.functional as F

from nemotron3.model.loss import REDUCTIONS, fused_linear_cross_entropy


def inputs(n=37, d=8, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    W = torch.randn(V, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (n,), generator=g)
    y[::5] = -100
    w = torch.rand(n, generator=g, dtype=torch.float64)
    return h, W, y, w


def reference(h, W, y, w, reduction, normalizer=None):
    per_token = F.cross_entropy(h @ W.T, y, reduction="none") * w         # 0 where y = -100
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / (w[y != -100].sum() if normalizer is None else normalizer)


@pytest.mark.parametrize("reduction,normalizer", [("mean", None), ("mean", 123.0), ("sum", None), ("none", None)])
@pytest.mark.parametrize("weighted", [False, True])
def test_reductions_weights_and_normalizer_match_cross_entropy_with_gradients(reduction, normalizer, weighted):
    h, W, y, w = inputs()
    w = w if weighted else torch.ones_like(w)
    leaves = [h.clone().requires_grad_(), W.clone().requires_grad_()]
    got, _ = fused_linear_cross_entropy(*leaves, y, chunk_rows=8, weights=w if weighted else None,
                                        reduction=reduction, normalizer=normalizer)
    ref_leaves = [h.clone().requires_grad_(), W.clone().requires_grad_()]
    ref = reference(*ref_leaves, y, w, reduction, normalizer)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(ref)                       # per-token upstream gradients for "none"
    (got * upstream).sum().backward()
    (ref * upstream).sum().backward()
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_none_gives_per_token_log_probabilities():
    h, W, y, _ = inputs(seed=1)
    got, _ = fused_linear_cross_entropy(h, W, y, reduction="none")
    logp = torch.log_softmax(h @ W.T, -1).gather(1, y.clamp(min=0)[:, None]).squeeze(1)
    torch.testing.assert_close(-got, torch.where(y != -100, logp, 0.0), rtol=1e-12, atol=1e-12)


def test_sums_over_micro_batches_divided_by_the_global_count_equal_the_whole_batch_mean():
    h, W, y, _ = inputs(n=40, seed=2)
    y[:15] = -100                                          # the two halves hold different numbers of targets
    whole, _ = fused_linear_cross_entropy(h, W, y)
    total = (y != -100).sum()
    halves = [fused_linear_cross_entropy(h[s], W, y[s], normalizer=total)[0] for s in (slice(0, 20), slice(20, 40))]
    torch.testing.assert_close(sum(halves), whole, rtol=1e-12, atol=1e-12)
    naive = sum(fused_linear_cross_entropy(h[s], W, y[s])[0] for s in (slice(0, 20), slice(20, 40))) / 2
    assert abs(naive - whole) > 1e-3                       # averaging the two means would be wrong


def test_bad_reduction_is_rejected():
    h, W, y, _ = inputs()
    with pytest.raises(ValueError, match="reduction='avg'"):
        fused_linear_cross_entropy(h, W, y, reduction="avg")


def test_nothing_the_size_of_the_head_is_held_between_forward_and_backward():
    """The only (V, d) tensor autograd keeps for backward is the head weight itself (no weight-gradient buffer per
    call, which for Nano would be 1.4 GB per head call)."""
    h, W, y, _ = inputs(n=64, d=16, V=300)
    h, W = h.float().requires_grad_(), W.float().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        for reduction in REDUCTIONS:
            fused_linear_cross_entropy(h, W, y, reduction=reduction)
    new_bytes = sum(t.untyped_storage().nbytes() for t in saved
                    if t.untyped_storage().data_ptr() not in (h.untyped_storage().data_ptr(),
                                                              W.untyped_storage().data_ptr()))
    assert saved and new_bytes <= len(REDUCTIONS) * 4 * h.shape[0] * 8      # a few (n,) vectors per call
