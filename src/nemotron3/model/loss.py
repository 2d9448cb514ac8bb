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

Scalar reductions: the forward pass already knows the gradient above up to the incoming scalar, so it computes each
chunk's logits once (float32), turns them into the gradient in place, and accumulates dh = G W and dW = G^T h right
away; backward only scales them. Same matmul FLOPs as logits + F.cross_entropy, but no (tokens, vocab) tensor (the
idea of Liger's FusedLinearCrossEntropy; written here from the formula above). Memory: the saved dW is a float32
(V, d) buffer per call (1.4 GB for Nano's 131072 x 2688, once for the main head and once per MTP depth) that lives
until backward. "none" (per-token values, e.g. RL log-probabilities) cannot know the incoming per-token gradients
in forward: it saves only h and logsumexp and recomputes each chunk's logits in backward (one more (n, V, d)
matmul, no (V, d) buffer held between forward and backward).
"""

from __future__ import annotations

import torch

REDUCTIONS = ("mean", "sum", "none")


def _chunk_logits(h_c, weight, ct):
    return (h_c @ weight.T).to(ct)                                            # (rows, V)


class LinearCrossEntropy(torch.autograd.Function):
    """Scalar reductions: sum_t scale_t l_t with scale_t = w_t / Z (0 where ignored), gradients made in forward."""

    @staticmethod
    def forward(ctx, h, weight, labels, scale, chunk_rows: int, needs_grad: bool):
        """h (n, d), weight (V, d), labels (n,) with ignored entries already replaced by 0, scale (n,) float ->
        (loss, number of correct top-1 guesses among scale != 0). needs_grad=False skips the gradient matmuls."""
        ct = scale.dtype
        loss = h.new_zeros((), dtype=ct)
        correct = torch.zeros((), dtype=torch.long, device=h.device)
        grad_h = torch.empty_like(h) if needs_grad else None
        grad_w = torch.zeros_like(weight, dtype=ct) if needs_grad and weight.requires_grad else None
        rows = torch.arange(min(chunk_rows, h.shape[0]), device=h.device)
        for start in range(0, h.shape[0], chunk_rows):
            h_c, y_c, s_c = (t[start:start + chunk_rows] for t in (h, labels, scale))
            logits = _chunk_logits(h_c, weight, ct)
            correct += ((logits.argmax(-1) == y_c) & (s_c != 0)).sum()
            lse = torch.logsumexp(logits, dim=-1)
            loss += ((lse - logits.gather(1, y_c[:, None]).squeeze(1)) * s_c).sum()
            if not needs_grad:
                continue
            G = logits.sub_(lse[:, None]).exp_()                                 # softmax, in place
            G[rows[:G.shape[0]], y_c] -= 1.0
            G.mul_(s_c[:, None])                                                 # d loss / d logits
            grad_h[start:start + chunk_rows] = (G.to(h.dtype) @ weight)
            if grad_w is not None:
                grad_w.addmm_(G.T, h_c.to(ct))
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (grad_h, grad_w)))
        ctx.has_grad_w, ctx.weight_dtype = grad_w is not None, weight.dtype
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_loss.to(grad_h.dtype)
        gw = (grad_w * grad_loss).to(ctx.weight_dtype) if ctx.has_grad_w else None
        return gh, gw, None, None, None, None


class LinearCrossEntropyPerToken(torch.autograd.Function):
    """reduction "none": scale_t l_t per token; backward recomputes the logits chunk by chunk."""

    @staticmethod
    def forward(ctx, h, weight, labels, scale, chunk_rows: int):
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
        ctx.save_for_backward(h, weight, labels, scale, lse)
        ctx.chunk_rows = chunk_rows
        ctx.mark_non_differentiable(correct)
        return losses, correct

    @staticmethod
    def backward(ctx, grad_losses, _grad_correct):
        h, weight, labels, scale, lse = ctx.saved_tensors
        ct, n = scale.dtype, ctx.chunk_rows
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=ct) if ctx.needs_input_grad[1] else None
        for start in range(0, h.shape[0], n):
            h_c, y_c = h[start:start + n], labels[start:start + n]
            G = _chunk_logits(h_c, weight, ct).sub_(lse[start:start + n, None]).exp_()       # softmax
            G[torch.arange(G.shape[0], device=G.device), y_c] -= 1.0
            G.mul_((scale[start:start + n] * grad_losses[start:start + n].to(ct))[:, None])
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
    if reduction == "none":
        losses, correct = LinearCrossEntropyPerToken.apply(h2, weight, labels, scale, chunk_rows)
        return losses.view(targets.shape), correct / n_valid
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    loss, correct = LinearCrossEntropy.apply(h2, weight, labels, scale, chunk_rows, needs_grad)
    return loss, correct / n_valid
