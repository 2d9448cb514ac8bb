"""Independent float64 oracle for GRPO as NeMo-RL runs it (Nemotron 3 RLVR): per-prompt, per-sequence, per-token
Python loops written from the formulas, sharing no code with src/nemotron3/rl/grpo.py.

    b_i = mean_{j!=i} r_j;  s_i = sqrt((mean_{j!=i} r_j^2 - b_i^2) n/(n-1)), n = G-1
    A_i = (r_i - b_i)/(s_i + 1e-6) if s_i > 0 else r_i - b_i
    rho = exp(logp - old);  l = max(-A rho, -A clip(rho, 1-el, 1+eh));  w = exp(old - gen) (detached)
    L = sum m w l / sum m + beta * sum m (exp(ref-logp) - (ref-logp) - 1) / sum m
"""

import math

import torch


def advantages_ref(rewards, normalize=True):
    out = []
    for row in rewards.tolist():
        G = len(row)
        n = G - 1
        adv_row = []
        for i in range(G):
            others = [row[j] for j in range(G) if j != i]
            b = sum(others) / n
            a = row[i] - b
            if normalize and n >= 2:
                var = (sum(x * x for x in others) / n - b * b) * n / (n - 1)
                s = math.sqrt(max(var, 0.0))
                if len(set(others)) > 1:                     # s > 0 (the others are not all equal)
                    a = a / (s + 1e-6)
            adv_row.append(a)
        out.append(adv_row)
    return torch.tensor(out, dtype=torch.float64)


def grpo_loss_ref(logp, old, gen, adv, mask, eps_low, eps_high, is_mode, lo, hi, seq_thr, beta=0.0, ref=None,
                  truncated=None):
    """logp: float64 leaf-derived (B, T) tensor (gradients flow through it); the rest plain float64 tensors.
    Returns (loss, n_masked_tokens, n_dropped_sequences)."""
    B, T = logp.shape
    total = logp.new_zeros(())
    kl_total = logp.new_zeros(())
    count = 0.0
    n_masked = 0
    n_dropped = 0
    for i in range(B):
        toks = [t for t in range(T) if mask[i, t] > 0]
        if not toks:
            continue
        err = sum(math.exp(abs(old[i, t].item() - gen[i, t].item())) for t in toks) / len(toks)
        drop = seq_thr is not None and err > seq_thr
        n_dropped += drop
        for t in toks:
            w = math.exp(old[i, t].item() - gen[i, t].item())
            if is_mode == "none":
                w = 1.0
            elif is_mode == "tis":
                n_masked += w > hi
                w = min(w, hi)
            elif is_mode == "mask":
                if not lo <= w <= hi:
                    w = 0.0
                    n_masked += 1
            if drop or (truncated is not None and truncated[i]):
                continue
            a = adv[i, t].item() if adv.dim() == 2 else adv[i].item()
            rho = torch.exp(logp[i, t] - old[i, t].item())
            rho_c = torch.clamp(rho, 1 - eps_low, 1 + eps_high)
            total = total + w * torch.maximum(-a * rho, -a * rho_c)
            if ref is not None:
                d = ref[i, t].item() - logp[i, t]
                kl_total = kl_total + torch.exp(d) - d - 1
            count += 1
    count = max(count, 1.0)
    return total / count + beta * kl_total / count, n_masked, n_dropped
