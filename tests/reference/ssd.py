"""Independent float64 oracles for the Mamba-2 mixer: a per-token loop over time, written from the equations
(Mamba-2 paper eq. 1 with scalar A per head; HF NemotronHMamba2Mixer for the layout), sharing no code with
src/nemotron3/model/mamba2.py.

    S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T,    y_t = S_t C_t + D_h x_t

Packed rows (seq_idx): where the sequence number changes, S_{t-1} is taken as 0 and the causal conv reads no
input of an earlier sequence, as if each sequence ran alone.
"""

import math

import torch


def ssd_recurrence_ref(x, dt, A, B, C, initial_state=None, seq_idx=None):
    """x (b, L, H, P), dt (b, L, H), A (H,), B/C (b, L, G, N) -> y (b, L, H, P), final state (b, H, P, N).
    float64, one step at a time. seq_idx (b, L): the state restarts from 0 where it changes."""
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    b, L, H, P = x.shape
    G, N = B.shape[-2:]
    S0 = torch.zeros(b, H, P, N, dtype=torch.float64) if initial_state is None else initial_state.double()
    S = [S0[:, h] for h in range(H)]                                   # per-head states, no in-place writes
    ys = []
    for t in range(L):
        y_t = []
        for h in range(H):
            g = h // (H // G)
            if seq_idx is not None and t > 0:           # a new sequence starts at t in some rows: forget S
                S[h] = S[h] * (seq_idx[:, t] == seq_idx[:, t - 1]).double()[:, None, None]
            S[h] = torch.exp(dt[:, t, h] * A[h])[:, None, None] * S[h] + \
                dt[:, t, h][:, None, None] * x[:, t, h][:, :, None] * B[:, t, g][:, None, :]
            y_t.append(torch.einsum("bpn,bn->bp", S[h], C[:, t, g]))
        ys.append(torch.stack(y_t, dim=1))
    S = torch.stack(S, dim=1)
    return torch.stack(ys, dim=1), S


def mamba_mixer_ref(mixer, hidden, time_step_limit=(0.0, math.inf), seq_idx=None):
    """The whole mixer in float64 from its parameters: in_proj, causal conv by explicit sums, silu, dt, the
    recurrence above, D skip, gated grouped RMSNorm, out_proj. hidden (b, L, d) -> (b, L, d). seq_idx (b, L):
    packed sequences, each computed as if alone."""
    p = {k: v.detach().double() for k, v in mixer.named_parameters()}
    H, P, G, N = mixer.num_heads, mixer.head_dim, mixer.n_groups, mixer.ssm_state_size
    d_inner, conv_dim, K = H * P, mixer.conv_dim, mixer.conv_kernel
    h = hidden.double()
    b, L, _ = h.shape
    zxbcdt = h @ p["in_proj.weight"].T + (p["in_proj.bias"] if "in_proj.bias" in p else 0)
    z, xBC, dt = zxbcdt[..., :d_inner], zxbcdt[..., d_inner:d_inner + conv_dim], zxbcdt[..., -H:]
    w = p["conv1d.weight"][:, 0]                                      # (conv_dim, K)
    conv = torch.zeros(b, L, conv_dim, dtype=torch.float64)
    for t in range(L):
        for k in range(K):                                            # tap k sees input t - (K-1) + k
            s = t - (K - 1) + k
            if s >= 0:
                same = 1.0 if seq_idx is None else (seq_idx[:, s] == seq_idx[:, t]).double()[:, None]
                conv[:, t] += same * w[:, k] * xBC[:, s]
    if "conv1d.bias" in p:
        conv += p["conv1d.bias"]
    xBC = conv * torch.sigmoid(conv)
    x, B, C = xBC[..., :d_inner], xBC[..., d_inner:d_inner + G * N], xBC[..., d_inner + G * N:]
    dt = torch.nn.functional.softplus(dt + p["dt_bias"]).clamp(*time_step_limit)
    A = -torch.exp(p["A_log"])
    y, _ = ssd_recurrence_ref(x.view(b, L, H, P), dt, A, B.view(b, L, G, N), C.view(b, L, G, N), seq_idx=seq_idx)
    y = y + p["D"][:, None] * x.view(b, L, H, P)
    g = y.reshape(b, L, d_inner) * (z * torch.sigmoid(z))
    g = g.view(b, L, G, d_inner // G)
    g = g / torch.sqrt((g ** 2).mean(-1, keepdim=True) + mixer.norm.eps)
    y = p["norm.weight"] * g.reshape(b, L, d_inner)
    return y @ p["out_proj.weight"].T + (p["out_proj.bias"] if "out_proj.bias" in p else 0)
