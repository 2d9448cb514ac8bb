"""Mamba-2 mixer: the chunked SSD scan (training / prefill), the O(1)-state recurrent step (decode), the causal
depthwise conv with its state, and the gated grouped RMSNorm.

Dimensions: b batch, t/L time, H heads, P head dim, G B/C groups (R = H/G heads share a group), N state size,
Q chunk length, c number of chunks, K conv kernel. d_inner = H*P.

Per head h the layer computes (Mamba-2 / SSD, Dao & Gu 2024, eq. 1 with scalar A):
    S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t B_t^T          S: (P, N), the state
    y_t = S_t C_t + D_h * x_t
with dt_t = clamp(softplus(dt_raw_t + dt_bias_h), *time_step_limit), A_h = -exp(A_log_h) < 0.
The chunked scan (`ssd_chunked`) evaluates the same thing blockwise: an attention-like quadratic form inside each
chunk of Q steps, a linear recurrence across chunks, with no Python loop over time. Sequences of any length are
padded to a multiple of Q with dt = 0 (no decay, no input), which leaves outputs and the final state exact.

Differences from HF NemotronHMamba2Mixer, on purpose: dt is clamped to `time_step_limit` (default (0, inf)) in
prefill, decode and verify alike (HF clamps at time_step_min in prefill only, so its own cached decode disagrees with
its forward); B and C are never repeated to H heads (matmuls run per group); the conv state keeps the last K-1
inputs (HF keeps K). Left out: the fused CUDA kernels of mamba_ssm (a later issue brings Triton).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .norm import GatedRMSNorm


# Decays below exp(-60) ~ 1e-26 are set to exactly 0. They change no float32 (or float64 at 1e-9) result, and
# letting exp() underflow into subnormal floats instead makes every later multiply on x86 CPUs ~10x slower
# (measured: the SSD forward of the 11M benchmark config went from 24.7 ms to 14.9 ms).
LOG_DECAY_FLOOR = -60.0


def decay_exp(log_decay: torch.Tensor) -> torch.Tensor:
    """exp(log_decay) for log_decay <= 0, flushed to 0 below exp(LOG_DECAY_FLOOR) (no subnormals)."""
    return torch.exp(log_decay.masked_fill(log_decay < LOG_DECAY_FLOOR, -math.inf))


def segsum_exp(a: torch.Tensor) -> torch.Tensor:
    """exp(sum_{s<j<=l} a_j) for l >= s, else 0.  a: (..., Q) -> (..., Q, Q) lower-triangular decay matrix."""
    cum = torch.cumsum(a, dim=-1)
    diff = cum[..., :, None] - cum[..., None, :]                              # (..., Q, Q): cum_l - cum_s
    causal = torch.ones(a.shape[-1], a.shape[-1], dtype=torch.bool, device=a.device).tril()
    return decay_exp(diff.masked_fill(~causal, -math.inf))


def ssd_chunked(x, dt, A, B, C, chunk_size: int, initial_state=None):
    """Chunked SSD scan (no D term). x: (b, L, H, P); dt: (b, L, H) after softplus/clamp; A: (H,);
    B, C: (b, L, G, N); initial_state: (b, H, P, N) or None. Returns y (b, L, H, P), final state (b, H, P, N).
    All inputs float32 (or float64 in tests)."""
    b, L, H, P = x.shape
    G, N = B.shape[-2:]
    R, Q = H // G, chunk_size
    pad = (-L) % Q
    if pad:   # dt = 0 on padded steps: exp(0) = 1 keeps the state, dt * x = 0 adds nothing
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    c = (L + pad) // Q
    x = x.reshape(b, c, Q, H, P)
    B = B.reshape(b, c, Q, G, N).transpose(2, 3)                              # (b, c, G, Q, N)
    C = C.reshape(b, c, Q, G, N).transpose(2, 3)                              # (b, c, G, Q, N)
    dt = dt.reshape(b, c, Q, H)
    a = (dt * A).transpose(2, 3)                                              # (b, c, H, Q)  log-decay per step
    a_cum = torch.cumsum(a, dim=-1)                                           # (b, c, H, Q)
    xdt = (x * dt[..., None]).permute(0, 1, 3, 2, 4)                          # (b, c, H, Q, P)  dt * x_t

    # 1. inside each chunk: y_l = sum_{s<=l} (C_l . B_s) exp(a_cum_l - a_cum_s) dt_s x_s   (the "attention" form)
    CB = C @ B.transpose(-1, -2)                                              # (b, c, G, Q, Q)
    M = CB[:, :, :, None] * segsum_exp(a).view(b, c, G, R, Q, Q)              # (b, c, G, R, Q, Q)
    y = M.reshape(b, c, H, Q, Q) @ xdt                                        # (b, c, H, Q, P)

    # 2. each chunk's own contribution to the state at its end: sum_s exp(a_cum_end - a_cum_s) dt_s x_s B_s^T
    to_end = decay_exp(a_cum[..., -1:] - a_cum)                               # (b, c, H, Q)
    xw = (xdt * to_end[..., None]).transpose(-1, -2)                          # (b, c, H, P, Q)
    states = (xw.reshape(b, c, G, R * P, Q) @ B).view(b, c, H, P, N)          # (b, c, H, P, N)

    # 3. across chunks: S_in[i] = sum_{j<=i} exp(z_i - z_j) states_j, z = cumulative chunk log-decay
    if initial_state is None:
        initial_state = x.new_zeros(b, H, P, N)
    states = torch.cat([initial_state[:, None].to(states.dtype), states], dim=1)     # (b, c+1, H, P, N)
    chunk_decay = segsum_exp(F.pad(a_cum[..., -1], (0, 0, 1, 0)).transpose(1, 2))  # (b, H, c+1, c+1)
    states = chunk_decay @ states.permute(0, 2, 1, 3, 4).reshape(b, H, c + 1, P * N)  # (b, H, c+1, P*N)
    final_state = states[:, :, -1].reshape(b, H, P, N)
    S_in = states[:, :, :-1].reshape(b, H, c, P, N).transpose(1, 2)              # (b, c, H, P, N) state entering chunk

    # 4. the incoming state seen from inside each chunk: y_l += exp(a_cum_l) C_l S_in^T
    S_in = S_in.reshape(b, c, G, R * P, N)
    y_off = (C @ S_in.transpose(-1, -2)).view(b, c, G, Q, R, P)               # (b, c, G, Q, R, P)
    y_off = y_off.permute(0, 1, 2, 4, 3, 5).reshape(b, c, H, Q, P) * decay_exp(a_cum)[..., None]
    y = (y + y_off).transpose(2, 3).reshape(b, c * Q, H, P)[:, :L]            # (b, L, H, P)
    return y, final_state


def ssd_step(x, dt, A, B, C, state):
    """One decode token, updating `state` in place. x: (b, H, P); dt: (b, H); B, C: (b, G, N); state (b, H, P, N).
    Heads are viewed as (G, R) so each group's B and C broadcast over its R heads without copies."""
    b, H, P = x.shape
    G, N = B.shape[-2:]
    S = state.view(b, G, H // G, P, N)
    decay = torch.exp(dt * A)                                                 # (b, H)
    S.mul_(decay.view(b, G, -1, 1, 1)).add_((dt[..., None] * x).view(b, G, -1, P, 1) * B.view(b, G, 1, 1, N))
    return (S.view(b, G, -1, N) @ C.view(b, G, N, 1)).view(b, H, P)         # y_t = S_t C_t


class Mamba2Mixer(nn.Module):
    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads, self.head_dim = config.mamba_num_heads, config.mamba_head_dim
        self.n_groups, self.ssm_state_size = config.n_groups, config.ssm_state_size
        self.conv_kernel, self.chunk_size = config.conv_kernel, config.chunk_size
        self.time_step_limit = tuple(config.time_step_limit)
        self.d_inner = config.mamba_intermediate_size
        self.conv_dim = config.mamba_conv_dim
        H = self.num_heads
        # in_proj output order is [z | x B C | dt] (HF checklist item 1); the conv sees x, B, C only
        self.in_proj = nn.Linear(self.hidden_size, self.d_inner + self.conv_dim + H, bias=config.use_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.conv_kernel, groups=self.conv_dim,
                                padding=self.conv_kernel - 1, bias=config.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.ones(H))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, H + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(H))
        self.norm = GatedRMSNorm(self.d_inner, self.n_groups, eps=config.layer_norm_epsilon)
        self.out_proj = nn.Linear(self.d_inner, self.hidden_size, bias=config.use_bias)

    def _dt(self, dt_raw, sdt):
        dt = F.softplus(dt_raw + self.dt_bias).to(sdt)
        lo, hi = self.time_step_limit
        return dt if (lo, hi) == (0.0, math.inf) else dt.clamp(lo, hi)      # softplus > 0 already

    def forward(self, hidden, mask=None, conv_state=None, ssm_state=None):
        """hidden: (b, L, d). mask: (b, L) with 0 at padding, or None. conv_state (b, conv_dim, K-1) and ssm_state
        (b, H, P, N) float32 are a cache's tensors, updated in place; None means start from zeros, keep nothing."""
        b, L, _ = hidden.shape
        H, P, G, N = self.num_heads, self.head_dim, self.n_groups, self.ssm_state_size
        if mask is not None:     # padded positions carry nothing (as HF: zero the input and the conv output)
            hidden = hidden * mask[:, :, None].to(hidden.dtype)
        z, xBC, dt_raw = self.in_proj(hidden).split([self.d_inner, self.conv_dim, H], dim=-1)
        sdt = torch.promote_types(hidden.dtype, torch.float32)               # scan dtype: float32 (float64 in tests)
        A = -torch.exp(self.A_log.to(sdt))                                    # (H,)  A < 0 keeps the state stable

        if ssm_state is not None and L == 1:      # decode: one recurrent step, state O(1) in sequence length
            window = torch.cat([conv_state, xBC.transpose(1, 2)], dim=-1)     # (b, conv_dim, K)
            conv_state.copy_(window[..., 1:])
            xBC = torch.einsum("bck,ck->bc", window, self.conv1d.weight[:, 0])  # (b, conv_dim)
            if self.conv1d.bias is not None:
                xBC = xBC + self.conv1d.bias
            x, B, C = F.silu(xBC).to(sdt).split([self.d_inner, G * N, G * N], dim=-1)
            x = x.view(b, H, P)
            y = ssd_step(x, self._dt(dt_raw[:, 0], sdt), A, B.view(b, G, N), C.view(b, G, N), ssm_state)
            y = (y + self.D.to(sdt)[:, None] * x).view(b, 1, self.d_inner)
        else:
            if mask is not None:    # zero padded conv inputs too, so a padded row equals the row alone even with
                xBC = xBC * mask[:, :, None].to(xBC.dtype)      # use_bias (HF lets in_proj's bias leak into the conv)
            xBC = xBC.transpose(1, 2)                                         # (b, conv_dim, L)
            if conv_state is None:
                xBC = self.conv1d(xBC)[..., :L]
            else:   # continue from the cached window; keep the last K-1 raw inputs for the next call
                window = torch.cat([conv_state.to(xBC.dtype), xBC], dim=-1)   # (b, conv_dim, K-1+L)
                conv_state.copy_(window[..., -(self.conv_kernel - 1):])
                xBC = F.conv1d(window, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)
            xBC = F.silu(xBC.transpose(1, 2))                                 # (b, L, conv_dim)
            if mask is not None:
                xBC = xBC * mask[:, :, None].to(xBC.dtype)
            x, B, C = (t.contiguous() for t in xBC.to(sdt).split([self.d_inner, G * N, G * N], dim=-1))
            x = x.view(b, L, H, P)
            y, final = ssd_chunked(x, self._dt(dt_raw, sdt), A, B.view(b, L, G, N), C.view(b, L, G, N),
                                   self.chunk_size, initial_state=ssm_state)
            if ssm_state is not None:
                ssm_state.copy_(final)
            y = (y + self.D.to(sdt)[:, None] * x).reshape(b, L, self.d_inner)
        y = self.norm(y, z)                                                   # gate before the grouped RMS
        return self.out_proj(y.to(hidden.dtype))
