"""Independent float64 oracle for MoE routing and experts: a per-token Python loop written from the equations
(DeepSeek-V3 sigmoid routing with group limit; HF NemotronHTopkRouter semantics), sharing no code with moe.py."""

import torch


def route_ref(x, W, bias, K, n_group, topk_group, norm, scale):
    """x (T, d) -> list per token of (expert ids set, {expert: weight})."""
    x, W, bias = x.double(), W.double(), bias.double()
    T, E = x.shape[0], W.shape[0]
    out = []
    for t in range(T):
        s = torch.sigmoid(W @ x[t])                                   # (E,)
        choice = s + bias
        allowed = list(range(E))
        if n_group > 1:
            size = E // n_group
            group_scores = [sorted(choice[g * size:(g + 1) * size].tolist(), reverse=True)[:2] for g in range(n_group)]
            best = sorted(range(n_group), key=lambda g: -sum(group_scores[g]))[:topk_group]
            allowed = [e for e in range(E) if e // size in best]
        ids = sorted(allowed, key=lambda e: -choice[e].item())[:K]
        w = {e: s[e].item() for e in ids}
        if norm:
            tot = sum(w.values()) + 1e-20
            w = {e: v / tot for e, v in w.items()}
        out.append({e: v * scale for e, v in w.items()})
    return out


def experts_ref(x, routing, up, down):
    """x (T, L), routing from route_ref, up (E, m, L), down (E, L, m) -> (T, L) float64."""
    x, up, down = x.double(), up.double(), down.double()
    y = torch.zeros_like(x)
    for t, weights in enumerate(routing):
        for e, w in weights.items():
            y[t] += w * (down[e] @ torch.relu(up[e] @ x[t]) ** 2)
    return y


def replay_ref(x, W, ids, norm, scale):
    """Router replay: x (T, d), forced expert ids (T, K) -> per token {expert: weight}, the weights being the
    router's sigmoid scores of exactly those experts (normalised if norm, times scale)."""
    x, W = x.double(), W.double()
    out = []
    for t in range(x.shape[0]):
        s = torch.sigmoid(W @ x[t])
        w = {int(e): s[int(e)].item() for e in ids[t]}
        if norm:
            tot = sum(w.values()) + 1e-20
            w = {e: v / tot for e, v in w.items()}
        out.append({e: v * scale for e, v in w.items()})
    return out
