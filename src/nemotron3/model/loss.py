"""Next-token cross-entropy fused with the LM head, computed in row chunks, never holding the (tokens, vocab) logits.

Per token t with a target y_t != ignore_index and a weight w_t (1 unless given):
    l_t = logsumexp(h_t W^T) - (h_t W^T)[y_t]            (= -log p(y_t | h_t): minus the token's log-probability)
    reduction "sum":  sum_t w_t l_t
              "mean": sum_t w_t l_t / Z,  Z = `normalizer` if given, else sum_t w_t over this call's valid targets
              "none": w_t l_t per token (0 where ignored), shaped like the targets
    d loss / d logits_t = (softmax(h_t W^T) - onehot(y_t)) * w_t / Z          ("sum": Z = 1)

Passing Z lets a trainer normalise by the valid targets of a whole optimizer step, over gradient accumulation and
data-parallel ranks (torchtitan's global_valid_tokens); per-micro-batch means averaged together are wrong as soon
as the micro-batches hold different numbers of valid targets.

Memory: no (V, d) tensor is held between forward and backward. The forward pass computes each chunk's logits
once (float32) and keeps only the per-token logsumexp; backward recomputes the chunk's logits and makes
dh = G W and dW = G^T h from them, with G = d loss / d logits above times the incoming gradient. The scalar
reductions are the per-token losses summed, so "sum", "mean" and "none" share this one backward. Cost: one more
(n, V, d) matmul than computing the gradients inside forward (Liger's FusedLinearCrossEntropy does that), which
must keep a float32 (V, d) weight gradient per call alive until backward: 1.4 GB for Nano's 131072 x 2688 head,
once for the main head and once per MTP depth. Measured in bench/fused_ce_memory.py (time and peak memory of
both, and of materialised logits). The idea of never holding logits is Liger's; the code is written here from the
formula above.
"""

from __future__ import annotations

import torch

REDUCTIONS = ("mean", "sum", "none")


def _chunk_logits(h_c, weight, ct):
    return (h_c @ weight.T).to(ct)                                            # (rows, V)


class LinearCrossEntropy(torch.autograd.Function):
    """scale_t l_t per token (0 where scale_t = 0); backward recomputes the logits chunk by chunk."""

    @staticmethod
    def forward(ctx, h, weight, labels, scale, chunk_rows: int):
        """h (n, d), weight (V, d), labels (n,) with ignored entries already replaced by 0, scale (n,) float ->
        (losses (n,), number of correct top-1 guesses among scale != 0)."""
        ct = scale.dtype
        losses = torch.empty(h.shape[0], dtype=ct, device=h.device)
        lse = torch.empty_like(losses)
        correct = torch.zeros((), dtype=torch.long, device=h.device)
        for start in range(0, h.shape[0], chunk_rows):
            h_c, y_c, s_c = (t[start:start + chunk_rows] for t in (h, labels, scale))
            logits = _chunk_logits(h_c, weight, ct)
            correct += ((logits.argmax(-1) == y_c) & (s_c != 0)).sum()
            lse[start:start + chunk_rows] = torch.logsumexp(logits, dim=-1)
            losses[start:start + chunk_rows] = (lse[start:start + chunk_rows] -
                                                logits.gather(1, y_c[:, None]).squeeze(1)) * s_c
        ctx.save_for_backward(h, weight, labels, scale, lse)                 # (n, d) and (V, d) are the inputs
        ctx.chunk_rows = chunk_rows
        ctx.mark_non_differentiable(correct)
        return losses, correct

    @staticmethod
    def backward(ctx, grad_losses, _grad_correct):
        h, weight, labels, scale, lse = ctx.saved_tensors
        ct, n = scale.dtype, ctx.chunk_rows
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=ct) if ctx.needs_input_grad[1] else None   # lives in backward only
        for start in range(0, h.shape[0], n):
            h_c, y_c = h[start:start + n], labels[start:start + n]
            G = _chunk_logits(h_c, weight, ct).sub_(lse[start:start + n, None]).exp_()       # softmax, in place
            G[torch.arange(G.shape[0], device=G.device), y_c] -= 1.0
            G.mul_((scale[start:start + n] * grad_losses[start:start + n].to(ct))[:, None])   # d loss / d logits
            if grad_h is not None:
                grad_h[start:start + n] = G.to(h.dtype) @ weight
            if grad_w is not None:
                grad_w.addmm_(G.T, h_c.to(ct))
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None


def fused_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int = -100, chunk_rows: int = 256, *, weights: torch.Tensor | None = None,
                               reduction: str = "mean", normalizer: torch.Tensor | float | None = None):
    """Cross-entropy of h @ weight^T against targets aligned with h (targets[t] = the token to predict at t), and
    the top-1 accuracy over the valid positions. h (..., d), targets (...), weights (...) float or None.
    Returns (loss, accuracy): loss is a scalar for "mean" / "sum", shaped like targets for "none"."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: use one of {REDUCTIONS}.")
    if normalizer is not None and reduction != "mean":
        raise ValueError("normalizer divides the weighted sum of reduction='mean'; with 'sum' or 'none' divide "
                         "yourself.")
    ct = torch.promote_types(h.dtype, torch.float32)                          # float32, float64 in tests
    h2, t1 = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    valid = t1 != ignore_index
    scale = valid.to(ct) if weights is None else weights.reshape(-1).to(ct) * valid
    n_valid = valid.sum().clamp(min=1)
    if reduction == "mean":
        Z = scale.sum().clamp(min=torch.finfo(ct).tiny) if normalizer is None else normalizer
        scale = scale / (Z.to(ct) if isinstance(Z, torch.Tensor) else Z)
    labels = torch.where(valid, t1, 0)
    losses, correct = LinearCrossEntropy.apply(h2, weight, labels, scale, chunk_rows)
    loss = losses.view(targets.shape) if reduction == "none" else losses.sum()
    return loss, correct / n_valid
