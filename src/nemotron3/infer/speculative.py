"""Speculative decoding's accept rule for a whole batch in a few tensor ops (Leviathan et al. 2023; gpt-fast's
loop without the per-position Python): every row accepts its own number of drafts.

Given, per row, K drafts d_1..d_K drawn from the drafter's distributions q_1..q_K and the target's distributions
p_0..p_K from one verify pass over [t0, d_1..d_K] (p_j is the target after d_j; both after the same sampling
processors):
    accept d_j  iff  u_j * q_j(d_j) < p_{j-1}(d_j)          (probability min(1, p/q); u_j uniform in [0, 1))
    n = the number of leading accepted drafts
    then one more token from  norm(max(p_n - q_{n+1}, 0))   if n < K (the residual; p_n itself if that is empty)
                        or    p_K                           if n = K  (the bonus token)
The emitted tokens d_1..d_n, c are distributed exactly as n + 1 tokens sampled from p one by one. Greedy rows pass
one-hot p and q (argmax), which makes the same rule "accept while the draft equals the target's argmax, then emit
the target's argmax". Forced tokens (a reasoning budget closing the thought) are one-hot p rows too.
"""

from __future__ import annotations

import torch

from .sampling import draw


def accept_drafts(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, u_accept: torch.Tensor,
                  u_final: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """p (b, K+1, V), q (b, K, V), drafts (b, K), u_accept (b, K), u_final (b,) -> (emitted (b, K+1): the accepted
    drafts then the correction or bonus token at index n, anything after it; n (b,) accepted drafts per row)."""
    b, K = drafts.shape
    p_d = p[:, :K].gather(-1, drafts[..., None]).squeeze(-1)                   # (b, K)  p_{j-1}(d_j)
    q_d = q.gather(-1, drafts[..., None]).squeeze(-1)                          # (b, K)  q_j(d_j) > 0: d_j ~ q_j
    ok = (u_accept * q_d < p_d).long()
    n = ok.cumprod(-1).sum(-1)                                                 # (b,)   leading accepted drafts
    idx = n[:, None, None].expand(b, 1, p.shape[-1])
    p_n = p.gather(1, idx).squeeze(1)                                          # (b, V)
    q_n = torch.cat([q, torch.zeros_like(q[:, :1])], 1).gather(1, idx).squeeze(1)   # q_{n+1}; 0 for the bonus
    resid = (p_n - q_n).clamp(min=0)
    resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, p_n)
    final = draw(resid, u_final)                                               # (b,)
    emitted = torch.cat([drafts, drafts[:, :1]], 1).scatter(1, n[:, None], final[:, None])
    return emitted, n
