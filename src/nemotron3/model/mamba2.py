"""Mamba-2 mixer: the chunked SSD scan (training / prefill), the O(1)-state recurrent step (decode), the causal
depthwise conv with its state, and the gated grouped RMSNorm.

Dimensions: b batch, t/L time, H heads, P head dim, G B/C groups (R = H/G heads share a group), N state size,
Q chunk length, c number of chunks, K conv kernel. d_inner = H*P.

Per head h the layer computes (Mamba-2 / SSD, Dao & Gu 2024, eq. 1 with scalar A):
    S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t B_t^T          S: (P, N), the state
    y_t = S_t C_t + D_h * x_t
with dt_t = clamp(softplus(dt_raw_t + dt_bias_h), *time_step_limit), A_h = -exp(A_log_h) < 0.
The chunked scan (`ssd_chunked`) evaluates the same thing blockwise: an attention-like quadratic form inside each
chunk of Q steps, and the recurrence across chunks passed from chunk to chunk (a loop over the c = L/Q chunks, so
time and memory stay linear in L; no loop over time steps). Sequences of any length are padded to a multiple of Q
with dt = 0 (no decay, no input), which leaves outputs and the final state exact. Packed rows (several sequences
one after another, numbered by `seq_idx` as in mamba_ssm) restart the conv window and the state at each new
sequence, inside a chunk and across chunks alike.

Differences from HF NemotronHMamba2Mixer, on purpose: dt is clamped to `time_step_limit` (default (0, inf)) in
prefill, decode and verify alike (HF clamps at time_step_min in prefill only, so its own cached decode disagrees with
its forward); B and C are never repeated to H heads (matmuls run per group); the conv state keeps the last K-1
inputs as (b, K-1, channels) (HF keeps K as (b, channels, K)). Left out: the fused CUDA kernels of mamba_ssm (a
later issue brings Triton kernels).
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


class SegsumExp(torch.autograd.Function):
    """L[l, s] = exp(cum_l - cum_s) for l >= s (else 0), cum = cumsum(a): the decay from step s to step l.
    Written as one autograd node because autograd through sub/mask/exp makes ~6 passes over the (.., Q, Q) tensor
    in backward; by hand it is one multiply and two sums:
        dL/dcum_l = sum_s G[l,s] L[l,s] - sum_l' G[l',l] L[l',l],   dL/da_j = sum_{l >= j} dL/dcum_l."""

    @staticmethod
    def forward(ctx, a):
        Q = a.shape[-1]
        cum = torch.cumsum(a, dim=-1)
        L = cum[..., :, None] - cum[..., None, :]                             # (..., Q, Q): cum_l - cum_s
        upper = torch.ones(Q, Q, dtype=torch.bool, device=a.device).triu(1)
        L.masked_fill_(upper | (L < LOG_DECAY_FLOOR), -math.inf).exp_()
        ctx.save_for_backward(L)
        return L

    @staticmethod
    def backward(ctx, grad):
        (L,) = ctx.saved_tensors
        P = grad * L
        grad_cum = P.sum(-1) - P.sum(-2)
        return grad_cum.flip(-1).cumsum(-1).flip(-1)                           # reverse cumsum: sum over l >= j


def segsum_exp(a: torch.Tensor) -> torch.Tensor:
    """exp(sum_{s<j<=l} a_j) for l >= s, else 0.  a: (..., Q) -> (..., Q, Q) lower-triangular decay matrix."""
    return SegsumExp.apply(a)


class ChunkStatePassing(torch.autograd.Function):
    """The recurrence across chunks, in time linear in their number c:  S_0 = initial,  S_{i+1} = g_i S_i + X_i,
    with g_i the decay over chunk i (0 where a new sequence starts inside it) and X_i what chunk i adds to the
    state at its end. Returns the state entering every chunk, S_in = (S_0 .. S_{c-1}), and the final S_c.
    One autograd node with a loop each way (c small steps), instead of a (c+1, c+1) decay matrix (quadratic in the
    length: 14.6 GiB in float32 for Nano at 1M tokens):
        dX_i = dS_{i+1},   dg_i = <dS_{i+1}, S_i>,   dS_i = g_i dS_{i+1} + dS_in_i      (backwards over i)."""

    @staticmethod
    def forward(ctx, g, X, initial):
        """g (b, c, H); X (b, c, H, P, N); initial (b, H, P, N)."""
        c = g.shape[1]
        S_in = torch.empty_like(X)                                            # (b, c, H, P, N)
        S = initial.to(X.dtype)
        for i in range(c):
            S_in[:, i] = S
            S = torch.addcmul(X[:, i], S, g[:, i, :, None, None])            # g_i S_i + X_i
        ctx.save_for_backward(g, S_in)
        return S_in, S

    @staticmethod
    def backward(ctx, grad_S_in, grad_final):
        g, S_in = ctx.saved_tensors
        grad_X = torch.empty_like(S_in)
        dS = grad_final
        for i in reversed(range(g.shape[1])):
            grad_X[:, i] = dS                                                 # dS = d loss / d S_{i+1}
            dS = torch.addcmul(grad_S_in[:, i], dS, g[:, i, :, None, None])
        grad_g = (grad_X * S_in).sum((-1, -2))                                # (b, c, H)
        return grad_g, grad_X, dS


def ssd_chunked(x, dt, A, B, C, chunk_size: int, initial_state=None, seq_idx=None):
    """Chunked SSD scan (no D term). x: (b, L, H, P); dt: (b, L, H) after softplus/clamp; A: (H,);
    B, C: (b, L, G, N); initial_state: (b, H, P, N) or None. Returns y (b, L, H, P), final state (b, H, P, N).
    seq_idx (b, L) integer, nondecreasing along L, numbers the packed sequences of a row: where it changes the
    state restarts from zero (as mamba_ssm's seq_idx), so no sequence sees another; initial_state continues the
    row's first sequence and the final state is its last one's. All inputs float32 (or float64 in tests)."""
    b, L, H, P = x.shape
    G, N = B.shape[-2:]
    R, Q = H // G, chunk_size
    pad = (-L) % Q
    if pad:   # dt = 0 on padded steps: exp(0) = 1 keeps the state, dt * x = 0 adds nothing
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
        if seq_idx is not None:                                               # padding continues the last sequence
            seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, pad)], dim=1)
    c = (L + pad) // Q
    x = x.reshape(b, c, Q, H, P)
    B = B.reshape(b, c, Q, G, N).transpose(2, 3)                              # (b, c, G, Q, N)
    C = C.reshape(b, c, Q, G, N).transpose(2, 3)                              # (b, c, G, Q, N)
    dt = dt.reshape(b, c, Q, H)
    a = (dt * A).transpose(2, 3)                                              # (b, c, H, Q)  log-decay per step
    a_cum = torch.cumsum(a, dim=-1)                                           # (b, c, H, Q)
    xdt = (x * dt[..., None]).permute(0, 1, 3, 2, 4)                          # (b, c, H, Q, P)  dt * x_t
    if seq_idx is not None:
        seq = seq_idx.reshape(b, c, Q)
        # the sequence the state entering each chunk belongs to: that of the step before the chunk
        seq_before = torch.cat([seq[:, :1, 0], seq[:, :-1, -1]], dim=1)       # (b, c)
        same_in_chunk = seq[..., :, None] == seq[..., None, :]               # (b, c, Q, Q)  l and s in one sequence
        same_as_end = (seq == seq[..., -1:])                                  # (b, c, Q)     s and the chunk's end
        same_as_before = (seq == seq_before[..., None])                       # (b, c, Q)     l and the incoming state

    # 1. inside each chunk: y_l = sum_{s<=l} (C_l . B_s) exp(a_cum_l - a_cum_s) dt_s x_s   (the "attention" form)
    CB = C @ B.transpose(-1, -2)                                              # (b, c, G, Q, Q)
    if seq_idx is not None:
        CB = CB * same_in_chunk[:, :, None].to(CB.dtype)                      # nothing flows across a boundary
    M = CB[:, :, :, None] * segsum_exp(a).view(b, c, G, R, Q, Q)              # (b, c, G, R, Q, Q)
    y = M.reshape(b, c, H, Q, Q) @ xdt                                        # (b, c, H, Q, P)

    # 2. each chunk's own contribution to the state at its end: sum_s exp(a_cum_end - a_cum_s) dt_s x_s B_s^T
    to_end = decay_exp(a_cum[..., -1:] - a_cum)                               # (b, c, H, Q)
    if seq_idx is not None:
        to_end = to_end * same_as_end[:, :, None].to(to_end.dtype)
    xw = (xdt * to_end[..., None]).transpose(-1, -2)                          # (b, c, H, P, Q)
    states = (xw.reshape(b, c, G, R * P, Q) @ B).view(b, c, H, P, N)          # (b, c, H, P, N)

    # 3. across chunks, in linear time: S_{i+1} = exp(a_cum_end_i) S_i + states_i (decay 0 over a boundary)
    chunk_decay = decay_exp(a_cum[..., -1])                                   # (b, c, H)
    if seq_idx is not None:
        chunk_decay = chunk_decay * (seq[..., -1] == seq_before)[..., None].to(chunk_decay.dtype)
    if initial_state is None:
        initial_state = x.new_zeros(b, H, P, N)
    S_in, final_state = ChunkStatePassing.apply(chunk_decay, states, initial_state)   # (b, c, H, P, N)

    # 4. the incoming state seen from inside each chunk: y_l += exp(a_cum_l) C_l S_in^T
    S_in = S_in.reshape(b, c, G, R * P, N)
    y_off = (C @ S_in.transpose(-1, -2)).view(b, c, G, Q, R, P)               # (b, c, G, Q, R, P)
    from_start = decay_exp(a_cum)                                             # (b, c, H, Q)
    if seq_idx is not None:
        from_start = from_start * same_as_before[:, :, None].to(from_start.dtype)
    y_off = y_off.permute(0, 1, 2, 4, 3, 5).reshape(b, c, H, Q, P) * from_start[..., None]
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


def ssd_states(x, dt, A, B, C, state):
    """A few tokens at once with the SSM state after every one of them (speculative verification): ssd_step
    unrolled over the L tokens (one graph under torch.compile), keeping a copy of the state after each.
    Measured on 2 CPU cores (H=8, P=N=64, L=3): 2.5x faster than the one-chunk SSD form (an L x L decay matrix
    contracted with every state) compiled at batch 1, 4x at batch 8, and faster eagerly too.
    x: (b, L, H, P); dt: (b, L, H); B, C: (b, L, G, N); state (b, H, P, N) = S_0, updated in place to S_L.
    Returns y (b, L, H, P) and the states (b, L, H, P, N)."""
    ys, states = [], []
    for t in range(x.shape[1]):
        ys.append(ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], state))
        states.append(state.clone())
    return torch.stack(ys, 1), torch.stack(states, 1)


class CausalConvSiLU(torch.autograd.Function):
    """silu(causal depthwise conv) in the (b, t, channels) layout, continuing from a window of the K-1 previous
    inputs:  pre_t = bias + sum_k w[:, k] * keep_k,t * u_{t-K+1+k},  u = [window ; x],  out = silu(pre),
    where keep_k,t = 1 if input t-K+1+k belongs to the same packed sequence as t (else 0; all 1 without packing).
    One autograd node with K shifted multiply-adds each way: no (b, c, t) transposes, no padded conv output to
    slice, no strided silu (together ~3x less time than nn.Conv1d + silu in a CPU training step)."""

    @staticmethod
    def forward(ctx, x, weight, bias, window, keep):
        """keep: (K, b, L, 1) 0/1 in x's dtype, or None for one sequence per row."""
        b, L, C = x.shape
        K = weight.shape[-1]
        u = torch.cat([window, x], dim=1)                                     # (b, K-1+L, C)
        pre = x.new_zeros(b, L, C, dtype=torch.promote_types(x.dtype, torch.float32))   # accumulate in >= fp32
        if bias is not None:
            pre += bias
        for k in range(K):
            tap = u[:, k:k + L] if keep is None else u[:, k:k + L] * keep[k]
            pre.addcmul_(tap, weight[:, k])
        ctx.save_for_backward(u, weight, pre, keep)
        ctx.has_bias = bias is not None
        return F.silu(pre).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        u, weight, pre, keep = ctx.saved_tensors
        K, L = weight.shape[-1], grad.shape[1]
        g = torch.ops.aten.silu_backward(grad.to(pre.dtype).contiguous(), pre)   # d out / d pre
        grad_u = torch.zeros_like(u, dtype=pre.dtype)
        grad_w = torch.empty_like(weight, dtype=pre.dtype)
        prod = torch.empty_like(g)                      # one scratch buffer for the K products (no allocations)
        for k in range(K):
            g_k = g if keep is None else g * keep[k]
            grad_u[:, k:k + L].addcmul_(g_k, weight[:, k])
            grad_w[:, k] = torch.mul(u[:, k:k + L], g_k, out=prod).sum((0, 1))
        grad_bias = g.sum((0, 1)).to(weight.dtype) if ctx.has_bias else None
        grad_u = grad_u.to(u.dtype)
        return grad_u[:, K - 1:], grad_w.to(weight.dtype), grad_bias, grad_u[:, :K - 1], None


def causal_conv_silu(x, weight, bias=None, window=None, seq_idx=None):
    """x (b, L, C), weight (C, K), bias (C,), window (b, K-1, C) of earlier inputs (zeros at a sequence start).
    seq_idx (b, L): packed-sequence number per position (see ssd_chunked); a tap never reads an input of another
    sequence, so each sequence's conv restarts from zeros at its first token. The window belongs to the row's
    first sequence."""
    K = weight.shape[-1]
    if window is None:
        window = x.new_zeros(x.shape[0], K - 1, x.shape[-1])
    keep = None
    if seq_idx is not None:    # keep[k][t] = [seq(t - K+1+k) == seq(t)], earlier positions counted as seq(0)
        prev = torch.cat([seq_idx[:, :1].expand(-1, K - 1), seq_idx], dim=1)        # (b, K-1+L)
        L = x.shape[1]
        keep = torch.stack([prev[:, k:k + L] == seq_idx for k in range(K)])[..., None].to(x.dtype)  # (K, b, L, 1)
    return CausalConvSiLU.apply(x, weight, bias, window.to(x.dtype), keep)


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
        # an nn.Conv1d for the checkpoint's names and shapes (conv1d.weight (C, 1, K)); causal_conv_silu computes it
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.conv_kernel, groups=self.conv_dim,
                                padding=self.conv_kernel - 1, bias=config.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.ones(H))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, H + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(H))
        self.norm = GatedRMSNorm(self.d_inner, self.n_groups, eps=config.layer_norm_epsilon)
        self.out_proj = nn.Linear(self.d_inner, self.hidden_size, bias=config.use_bias)

    def _dt(self, dt_raw, sdt, dt_bias=None):
        """dt = clamp(softplus(dt_raw + dt_bias)); dt_bias: some heads' biases (context parallelism), else all."""
        dt = F.softplus(dt_raw + (self.dt_bias if dt_bias is None else dt_bias)).to(sdt)
        lo, hi = self.time_step_limit
        return dt if (lo, hi) == (0.0, math.inf) else dt.clamp(lo, hi)      # softplus > 0 already

    def _recurrent(self, xBC, dt_raw, conv_state, ssm_state, A, sdt):
        """One decode token through the conv window and the SSM state (both updated in place). xBC (b, 1, C)."""
        b = xBC.shape[0]
        H, P, G, N = self.num_heads, self.head_dim, self.n_groups, self.ssm_state_size
        window = torch.cat([conv_state, xBC.to(conv_state.dtype)], dim=1)     # (b, K, conv_dim)
        conv_state.copy_(window[:, 1:])
        xc = torch.einsum("bkc,ck->bc", window, self.conv1d.weight[:, 0])    # (b, conv_dim)  depthwise taps
        if self.conv1d.bias is not None:
            xc = xc + self.conv1d.bias
        x, B, C = F.silu(xc).to(sdt).split([self.d_inner, G * N, G * N], dim=-1)
        x = x.view(b, H, P)
        y = ssd_step(x, self._dt(dt_raw[:, 0], sdt), A, B.view(b, G, N), C.view(b, G, N), ssm_state)
        return (y + self.D.to(sdt)[:, None] * x).view(b, 1, self.d_inner)

    def _verify(self, xBC, dt_raw, conv_state, ssm_state, A, sdt):
        """L tokens at once, returning the (conv window, SSM state) after every token, (b, L, K-1, C) and
        (b, L, H, P, N), so that a speculative verifier can keep the state of any accepted prefix (vLLM / SGLang /
        Megatron do the same: a Mamba state cannot be rolled back, only recorded). The conv windows are slices of
        [window ; inputs], the states come from ssd_states; the cache ends after token L."""
        b, L, _ = xBC.shape
        H, P, G, N, K = self.num_heads, self.head_dim, self.n_groups, self.ssm_state_size, self.conv_kernel
        u = torch.cat([conv_state, xBC.to(conv_state.dtype)], dim=1)         # (b, K-1+L, C)
        taps = u.unfold(1, K, 1)                                              # (b, L, C, K) inputs t-K+1..t
        xc = (taps * self.conv1d.weight[:, 0]).sum(-1)                        # (b, L, C)  depthwise conv
        if self.conv1d.bias is not None:
            xc = xc + self.conv1d.bias
        windows = taps[..., 1:].transpose(-1, -2)                             # (b, L, K-1, C) window after token t
        conv_state.copy_(windows[:, -1])
        x, B, C = F.silu(xc).to(sdt).split([self.d_inner, G * N, G * N], dim=-1)
        x = x.reshape(b, L, H, P)
        y, ssm = ssd_states(x, self._dt(dt_raw, sdt), A, B.reshape(b, L, G, N), C.reshape(b, L, G, N), ssm_state)
        y = (y + self.D.to(sdt)[:, None] * x).reshape(b, L, self.d_inner)
        return y, (windows, ssm)

    def forward(self, hidden, mask=None, conv_state=None, ssm_state=None, keep_states: bool = False, seq_idx=None):
        """hidden: (b, L, d). mask: (b, L) with 0 at padding, or None. conv_state (b, K-1, conv_dim) and ssm_state
        (b, H, P, N) float32 are a cache's tensors, updated in place; None means start from zeros, keep nothing.
        keep_states=True (with a cache, no padding): the L tokens run through ssd_states and the result is
        (output, (conv states, SSM states) after every token) for a speculative verifier's rollback.
        seq_idx: (b, L) packed-sequence numbers (nondecreasing per row) or None; conv window and SSM state restart
        at each new number, so each packed sequence is computed as if alone (chunked path only)."""
        b, L, _ = hidden.shape
        H, P, G, N = self.num_heads, self.head_dim, self.n_groups, self.ssm_state_size
        if mask is not None:     # padded positions carry nothing (as HF: zero the input and the conv output)
            hidden = hidden * mask[:, :, None].to(hidden.dtype)
        z, xBC, dt_raw = self.in_proj(hidden).split([self.d_inner, self.conv_dim, H], dim=-1)
        sdt = torch.promote_types(hidden.dtype, torch.float32)               # scan dtype: float32 (float64 in tests)
        A = -torch.exp(self.A_log.to(sdt))                                    # (H,)  A < 0 keeps the state stable

        w = self.conv1d.weight[:, 0]                                          # (conv_dim, K) depthwise taps
        states = None
        if ssm_state is not None and (L == 1 or keep_states):                # decode / verify
            if keep_states and mask is not None:
                raise ValueError("keep_states needs unpadded inputs (a verify pass has no padding).")
            if keep_states:
                y, states = self._verify(xBC, dt_raw, conv_state, ssm_state, A, sdt)
            else:
                y = self._recurrent(xBC, dt_raw, conv_state, ssm_state, A, sdt)
        else:
            if mask is not None:    # zero padded conv inputs too, so a padded row equals the row alone even with
                xBC = xBC * mask[:, :, None].to(xBC.dtype)      # use_bias (HF lets in_proj's bias leak into the conv)
            if conv_state is not None:     # the next call's window: the last K-1 raw inputs (read before the update)
                k = self.conv_kernel - 1
                next_window = xBC[:, -k:] if L >= k else torch.cat([conv_state[:, L:], xBC.to(conv_state.dtype)], 1)
                if seq_idx is not None:    # the state continues the row's last sequence: drop earlier ones' inputs
                    seq_of = torch.cat([seq_idx[:, :1].expand(-1, k), seq_idx], dim=1)[:, -k:]   # (b, K-1)
                    next_window = next_window * (seq_of == seq_idx[:, -1:])[..., None].to(next_window.dtype)
            xBC = causal_conv_silu(xBC, w, self.conv1d.bias, conv_state, seq_idx)    # (b, L, conv_dim)
            if conv_state is not None:
                conv_state.copy_(next_window)
            if mask is not None:
                xBC = xBC * mask[:, :, None].to(xBC.dtype)
            x, B, C = (t.contiguous() for t in xBC.to(sdt).split([self.d_inner, G * N, G * N], dim=-1))
            x = x.view(b, L, H, P)
            # Any chunk length gives the same result; on CPUs the quadratic in-chunk part dominates and 64 is
            # faster than NVIDIA's 128 (11M benchmark training step: 0.56 s -> 0.54 s); GPUs keep chunk_size.
            Q = self.chunk_size if hidden.is_cuda else min(self.chunk_size, 64)
            y, final = ssd_chunked(x, self._dt(dt_raw, sdt), A, B.view(b, L, G, N), C.view(b, L, G, N), Q,
                                   initial_state=ssm_state, seq_idx=seq_idx)
            if ssm_state is not None:
                ssm_state.copy_(final)
            y = (y + self.D.to(sdt)[:, None] * x).reshape(b, L, self.d_inner)
        y = self.norm(y, z)                                                   # gate before the grouped RMS
        out = self.out_proj(y.to(hidden.dtype))
        return (out, states) if keep_states else out
