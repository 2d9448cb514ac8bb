"""Next-token cross-entropy fused with the LM head, computed in row chunks, never holding the (tokens, vocab) logits.

    loss = mean_t [ logsumexp(h_t W^T) - (h_t W^T)[y_t] ]      over tokens with y_t != ignore_index
    d loss / d logits_t = (softmax(h_t W^T) - onehot(y_t)) / n_valid

The forward pass already knows that gradient, so it computes each chunk's logits once (float32), turns them into
the gradient in place, and accumulates dh = G W and dW = G^T h right away; backward only scales them by the
incoming gradient. Same matmul FLOPs as logits + F.cross_entropy, but no (tokens, vocab) tensor to allocate, fill,
log-softmax and read back (the idea of Liger's FusedLinearCrossEntropy; written here from the formula above).
Used by `NemotronForCausalLM.forward(..., labels=...)` and, later, the training loop.
"""

from __future__ import annotations

import torch


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, ignore_index: int, chunk_rows: int, needs_grad: bool):
        """h (n, d), weight (V, d), labels (n,) -> (mean loss over valid labels, number of correct top-1 guesses).
        With needs_grad=False (evaluation) the two gradient matmuls are skipped."""
        ct = torch.promote_types(h.dtype, torch.float32)                         # float32, float64 in tests
        n_valid = (labels != ignore_index).sum().clamp(min=1)
        loss = h.new_zeros((), dtype=ct)
        correct = torch.zeros((), dtype=torch.long, device=h.device)
        grad_h = torch.empty_like(h) if needs_grad else None
        grad_w = torch.zeros_like(weight, dtype=ct) if needs_grad and weight.requires_grad else None
        for start in range(0, h.shape[0], chunk_rows):
            h_c, y_c = h[start:start + chunk_rows], labels[start:start + chunk_rows]
            logits = (h_c @ weight.T).to(ct)                                     # (rows, V)
            valid = y_c != ignore_index
            y_safe = torch.where(valid, y_c, 0)
            correct += ((logits.argmax(-1) == y_c) & valid).sum()
            lse = torch.logsumexp(logits, dim=-1)
            loss += ((lse - logits.gather(1, y_safe[:, None]).squeeze(1)) * valid).sum()
            if not needs_grad:
                continue
            G = logits.sub_(lse[:, None]).exp_()                                 # softmax, in place
            G[torch.arange(G.shape[0], device=G.device), y_safe] -= 1.0
            G.mul_((valid.to(ct) / n_valid.to(ct))[:, None])                     # d loss / d logits
            grad_h[start:start + chunk_rows] = (G.to(h.dtype) @ weight)
            if grad_w is not None:
                grad_w.addmm_(G.T, h_c.to(ct))
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (grad_h, grad_w)))
        ctx.has_grad_w, ctx.weight_dtype = grad_w is not None, weight.dtype
        ctx.mark_non_differentiable(correct)
        return loss / n_valid, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_loss.to(grad_h.dtype)
        gw = (grad_w * grad_loss).to(ctx.weight_dtype) if ctx.has_grad_w else None
        return gh, gw, None, None, None, None


def fused_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int = -100, chunk_rows: int = 256):
    """Mean cross-entropy of h @ weight^T against targets aligned with h (targets[t] = the token to predict at t),
    and the top-1 accuracy over the same valid positions. Returns (loss, accuracy)."""
    h2, t1 = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    loss, correct = LinearCrossEntropy.apply(h2, weight, t1, ignore_index, chunk_rows, needs_grad)
    return loss, correct / (t1 != ignore_index).sum().clamp(min=1)
