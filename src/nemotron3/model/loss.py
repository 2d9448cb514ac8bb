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
    def forward(ctx, h, weight, labels, ignore_index: int, chunk_rows: int):
        """h (n, d), weight (V, d), labels (n,) -> mean loss over valid labels (scalar, at least float32)."""
        ct = torch.promote_types(h.dtype, torch.float32)                         # float32, float64 in tests
        n_valid = (labels != ignore_index).sum().clamp(min=1)
        loss = h.new_zeros((), dtype=ct)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight, dtype=ct) if weight.requires_grad else None
        for start in range(0, h.shape[0], chunk_rows):
            h_c, y_c = h[start:start + chunk_rows], labels[start:start + chunk_rows]
            logits = (h_c @ weight.T).to(ct)                                     # (rows, V)
            valid = y_c != ignore_index
            y_safe = torch.where(valid, y_c, 0)
            lse = torch.logsumexp(logits, dim=-1)
            loss += ((lse - logits.gather(1, y_safe[:, None]).squeeze(1)) * valid).sum()
            G = logits.sub_(lse[:, None]).exp_()                                 # softmax, in place
            G[torch.arange(G.shape[0], device=G.device), y_safe] -= 1.0
            G.mul_((valid.to(ct) / n_valid.to(ct))[:, None])                     # d loss / d logits
            grad_h[start:start + chunk_rows] = (G.to(h.dtype) @ weight)
            if grad_w is not None:
                grad_w.addmm_(G.T, h_c.to(ct))
        ctx.save_for_backward(grad_h, grad_w if grad_w is not None else torch.empty(0))
        ctx.has_grad_w, ctx.weight_dtype = grad_w is not None, weight.dtype
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_loss.to(grad_h.dtype)
        gw = (grad_w * grad_loss).to(ctx.weight_dtype) if ctx.has_grad_w else None
        return gh, gw, None, None, None


def next_token_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                    chunk_rows: int = 256) -> torch.Tensor:
    """Mean cross-entropy of lm_head(h) against labels already aligned with h (labels[t] = the token after t)."""
    return LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, labels.reshape(-1), ignore_index,
                                    chunk_rows)
