"""MoE expert balancing: DeepSeek-V3's aux-loss-free bias update, the sequence-level auxiliary loss, and load
statistics. Nemotron 3 uses both: bias rate 1e-3 and aux-loss coefficient 1e-4 (nemotron3_spec.md §5.1).

Bias update (Megatron `get_updated_expert_bias`), after each optimizer step, with c_e the number of (token, slot)
assignments expert e received over the global batch under the actual (biased) routing:
    b_e <- b_e + rate * sign(mean(c) - c_e)          the bias only steers the choice, never the combine weights
Sequence aux loss (Megatron `_apply_seq_aux_loss`), per sequence of T tokens, then averaged over sequences:
    s^ = s / sum_e s  (sigmoid scores renormalised over all E experts, no bias)
    f_e = #(tokens whose top-K of s^ holds e) / (T K),   P_e = mean_t s^_{t,e}
    L = coeff * E * sum_e f_e P_e                    (= coeff when routing is uniform; gradient through P only)
The router, not the model, owns neither rule: the trainer calls these with the RouterOutput the model returns.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def update_expert_bias(bias: torch.Tensor, counts: torch.Tensor, rate: float = 1e-3) -> None:
    """In place: b_e += rate * sign(mean(c) - c_e). counts: (E,) assignments per expert (all-reduce them first
    in data-parallel runs, so every rank applies the same update)."""
    counts = counts.to(torch.float32)
    bias.add_(rate * torch.sign(counts.mean() - counts).to(bias.dtype))


def expert_counts(ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E,) number of (token, slot) assignments per expert."""
    return torch.bincount(ids_TK.reshape(-1), minlength=num_experts)


def sequence_aux_loss(scores_TE: torch.Tensor, batch: int, top_k: int, coeff: float = 1e-4,
                      cp_group=None) -> torch.Tensor:
    """scores_TE: (batch * seq_len, E) sigmoid router scores (RouterOutput.scores_TE), sequences contiguous.
    cp_group (context parallelism): the rows are this rank's slices of sequences the group shares; the top-K counts
    are summed over the group and P_e is this rank's share of the sequence mean, so the ranks' losses add up to the
    loss of the whole sequences (and so do their gradients, which flow through P only)."""
    E = scores_TE.shape[-1]
    s = scores_TE.to(torch.promote_types(scores_TE.dtype, torch.float32)).view(batch, -1, E)
    s_hat = s / (s.sum(-1, keepdim=True) + 1e-20)                             # (b, T, E)
    T = s.shape[1]
    chosen = torch.zeros_like(s_hat).scatter_(-1, s_hat.topk(top_k, dim=-1).indices, 1.0)
    counts = chosen.sum(1)                                                    # (b, E), no gradient
    if cp_group is not None:
        import torch.distributed as dist
        dist.all_reduce(counts, group=cp_group)
        T *= dist.get_world_size(cp_group)
    f = counts / (T * top_k)
    P = s_hat.sum(1) / T                                                      # (b, E)
    return coeff * E * (f * P).sum(-1).mean()


@torch.no_grad()
def load_stats(counts: torch.Tensor) -> dict[str, float]:
    """max/mean load, normalised entropy of the load distribution (1 = uniform), and dead experts (load 0)."""
    c = counts.to(torch.float64)
    p = c / c.sum().clamp(min=1)
    nz = p[p > 0]
    entropy = float(-(nz * nz.log()).sum() / torch.log(torch.tensor(float(len(c))))) if len(c) > 1 else 1.0
    return dict(max_over_mean=float(c.max() / c.mean().clamp(min=1e-12)), entropy=entropy,
                dead_experts=int((c == 0).sum()))
