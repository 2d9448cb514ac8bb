"""GRPO as NeMo-RL runs it for Nemotron 3 (Nano/Super RLVR): group advantages and the clipped, importance-corrected
policy-gradient loss (Nemotron 3 Nano §3.2.5, Super §3.2.4; NeMo-RL `ClippedPGLossFn`).

Legend: P prompts, G samples per prompt, B = P*G sequences, T tokens per sequence.

Advantages, per prompt over its G rewards r_1..r_G (leave-one-out baseline and leave-one-out std):
    b_i = mean_{j!=i} r_j
    s_i = sqrt((mean_{j!=i} r_j^2 - b_i^2) * n/(n-1)),   n = G-1    (unbiased std of the OTHER samples)
    A_i = (r_i - b_i) / (s_i + 1e-6)   if s_i > 0   else   r_i - b_i
Loss, per token t of sequence i (all logprobs are of the sampled token):
    rho_t  = exp(logp_t - old_logp_t)                         new / old training policy
    rho'_t = clip(rho_t, 1 - eps_low, 1 + eps_high)           DAPO clip-higher, eps = 0.2 / 0.28
    l_t    = max(-A rho_t, -A rho'_t)
    w_t    = sg(exp(old_logp_t - gen_logp_t))                 train / inference importance weight
    L      = sum_{i,t} m w l / sum_{i,t} m  +  beta * KL_k3   token-level mean over the whole batch
m is the token mask times the sample mask. The sample mask drops sequences whose inference logprobs are too far off
(err_i = mean_t exp|old_logp - gen_logp| > seq_error_threshold) and, with overlong filtering, truncated sequences
(kept for the baseline, excluded from the loss). The correction w has four modes: none (w = 1), raw (w), tis
(min(w, C), truncated IS) and mask (w * 1[lo <= w <= hi], the masked IS of Nemotron 3, default bounds 0.5 / 5; the
production thresholds are unpublished, these are NeMo-RL's reference values).
KL_k3 = mean_t m (exp(ref - logp) - (ref - logp) - 1), off by default (beta = 0 for RLVR; Super RLHF used 1e-4).

Left out: the extra advantage of -5 Super gives to tokens of malformed tool calls (the caller can write it into a
(B, T) advantage tensor), the sequence-level `seq-mask-tis` mode and the router freezing (a trainer concern).
"""

from __future__ import annotations

import torch

IS_MODES = ("none", "raw", "tis", "mask")


def group_advantages(rewards: torch.Tensor, *, normalize: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """(P, G) rewards -> (P, G) advantages: r_i minus the mean of the other G-1 rewards of its prompt, divided by
    (their unbiased std + eps) when `normalize` and that std is not 0. Needs G >= 2; with G = 2 the std of one
    other sample is undefined (n/(n-1) = 1/0) and the plain difference is used."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (prompts, samples) with at least 2 samples per prompt for a leave-one-out "
                         f"baseline; got shape {tuple(rewards.shape)}. Sample G >= 2 completions per prompt.")
    r = rewards.double()
    G = r.shape[1]
    n = G - 1
    others = 1.0 - torch.eye(G, dtype=r.dtype, device=r.device)        # (G, G): row i selects j != i
    baseline = r @ others / n                                            # (P, G)  b_i
    adv = r - baseline
    if normalize and n >= 2:
        # two-pass variance about b_i: exact 0 when the others are all equal (the one-pass form of the formula
        # leaves rounding residue there, and dividing by residue + 1e-6 would blow the advantage up)
        dev2 = (r[:, None, :] - baseline[:, :, None]) ** 2              # (P, G, G)  (r_j - b_i)^2
        std = torch.sqrt((dev2 * others).sum(-1) / (n - 1))             # (P, G)
        lo = torch.where(others.bool(), r[:, None, :], torch.inf).amin(-1)
        hi = torch.where(others.bool(), r[:, None, :], -torch.inf).amax(-1)
        spread = hi > lo                                                 # s_i > 0 exactly when the others differ
        adv = torch.where(spread, adv / (std + eps), adv)
    return adv.to(rewards.dtype)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, gen_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, *, eps_low: float = 0.2, eps_high: float = 0.28, is_mode: str = "mask",
              is_bounds: tuple[float, float] = (0.5, 5.0), seq_error_threshold: float | None = 2.0,
              kl_beta: float = 0.0, ref_logp: torch.Tensor | None = None, adv_clip: float | None = None,
              truncated: torch.Tensor | None = None, token_count: float | None = None
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss of the module docstring and its per-step statistics.

    logp (B, T): log pi_theta of the sampled tokens, with gradient. old_logp (B, T): the training policy before this
    update (detached; equal to logp's values with one update per rollout). gen_logp (B, T): what the inference engine
    reported. advantages: (B,) or (B, T). mask (B, T): 1 on completion tokens to train on. is_bounds: (lo, hi) for
    mode "mask"; mode "tis" truncates at hi. seq_error_threshold: None turns the sequence filter off. ref_logp
    (B, T): reference policy, needed when kl_beta > 0. adv_clip: clip advantages to [-c, c] (Super: 50).
    truncated (B,) bool: sequences cut at the length limit, dropped from the loss (overlong filtering).
    token_count: the denominator when a batch is split into micro-batches (the whole batch's sum of m), so that the
    summed micro-batch losses equal the whole-batch token mean; default: this call's sum of m.
    """
    if is_mode not in IS_MODES:
        raise ValueError(f"is_mode={is_mode!r} is unknown; use one of {IS_MODES}.")
    lo, hi = is_bounds
    if not 0 <= lo < hi:
        raise ValueError(f"is_bounds={is_bounds} must satisfy 0 <= lo < hi, e.g. (0.5, 5.0).")
    if kl_beta > 0 and ref_logp is None:
        raise ValueError("kl_beta > 0 needs ref_logp, the reference policy's logprobs of the sampled tokens.")
    if logp.shape != old_logp.shape or logp.shape != gen_logp.shape or logp.shape != mask.shape:
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)}, gen_logp "
                         f"{tuple(gen_logp.shape)} and mask {tuple(mask.shape)} must all be (batch, tokens).")
    B, T = logp.shape
    token_mask = mask.to(logp.dtype)
    old_logp, gen_logp = old_logp.detach().to(logp.dtype), gen_logp.detach().to(logp.dtype)
    A = advantages.detach().to(logp.dtype)
    A = A[:, None].expand(B, T) if A.dim() == 1 else A                   # (B, T)
    if adv_clip is not None:
        A = A.clamp(-adv_clip, adv_clip)

    # 1. train/inference mismatch: token weights w and the sequence filter
    delta = old_logp - gen_logp                                          # (B, T)  log w
    w = torch.exp(delta)
    if is_mode == "none":
        w_used, suppressed = torch.ones_like(w), torch.zeros_like(w, dtype=torch.bool)
    elif is_mode == "raw":
        w_used, suppressed = w, torch.zeros_like(w, dtype=torch.bool)
    elif is_mode == "tis":
        w_used, suppressed = w.clamp(max=hi), w > hi
    else:
        suppressed = (w < lo) | (w > hi)
        w_used = torch.where(suppressed, torch.zeros_like(w), w)
    tokens_per_seq = token_mask.sum(1)                                   # (B,)
    has_tokens = tokens_per_seq > 0
    seq_err = (torch.exp(delta.abs()) * token_mask).sum(1) / tokens_per_seq.clamp(min=1)   # (B,)
    dropped = has_tokens & (seq_err > seq_error_threshold) if seq_error_threshold is not None \
        else torch.zeros_like(has_tokens)
    keep = ~dropped
    if truncated is not None:
        keep = keep & ~truncated.bool()
    m = token_mask * keep[:, None].to(logp.dtype)                        # (B, T)  token mask x sample mask

    # 2. clipped surrogate: l = max(-A rho, -A clip(rho))
    rho = torch.exp(logp - old_logp)
    rho_clipped = rho.clamp(1 - eps_low, 1 + eps_high)
    pg = torch.maximum(-A * rho, -A * rho_clipped)                       # (B, T)
    denom = m.sum() if token_count is None else m.new_tensor(float(token_count))
    denom = denom.clamp(min=1)                                           # an all-masked batch gives loss 0
    pg_loss = (m * w_used * pg).sum() / denom
    loss = pg_loss

    # 3. optional k3 KL to a reference: exp(ref - logp) - (ref - logp) - 1 >= 0
    kl = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if ref_logp is not None:
        d = ref_logp.detach().to(logp.dtype) - logp
        kl = (m * (torch.exp(d) - d - 1)).sum() / denom
        if kl_beta > 0:
            loss = loss + kl_beta * kl

    with torch.no_grad():
        valid = token_mask > 0
        n_valid = valid.sum().clamp(min=1)
        abs_delta = delta.abs()[valid]
        clipped = (-A * rho_clipped > -A * rho) & (m > 0)
        stats = {
            "loss": loss.item(),
            "pg_loss": pg_loss.item(),
            "kl": kl.item(),
            "tokens": m.sum().item(),
            "logp_diff_mean": abs_delta.mean().item() if abs_delta.numel() else 0.0,
            "logp_diff_max": abs_delta.max().item() if abs_delta.numel() else 0.0,
            "is_weight_mean": (w * valid).sum().div(n_valid).item(),
            "is_masked_frac": (suppressed & valid).sum().div(n_valid).item(),
            "seq_dropped_frac": dropped.sum().div(has_tokens.sum().clamp(min=1)).item(),
            "seq_error_mean": seq_err[has_tokens].mean().item() if has_tokens.any() else 0.0,
            "clip_frac": clipped.sum().div(m.sum().clamp(min=1)).item(),
        }
    return loss, stats
