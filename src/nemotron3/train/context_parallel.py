"""Context parallelism (--cp C): the C ranks of a cp group share every row of a micro-batch, each holding L/C
consecutive tokens of it, so activation memory per rank falls C-fold for long sequences. Built as Megatron-LM builds
it for hybrid models (DeepSpeed-Ulysses all-to-alls around attention; the same head split for Mamba-2), on torch's
autograd all-to-all (`all_to_all_single_autograd`), so it runs on NCCL and on gloo alike (torch's own causal
`context_parallel` is CUDA-only and knows nothing of Mamba layers, which need the whole sequence).

    torchrun --nproc_per_node 2 -m nemotron3 train --preset small --seq-len 16384 --cp 2   # cp 2: 8K tokens a rank
    torchrun --nproc_per_node 8 -m nemotron3 train --preset tiny --ep 2 --cp 2             # dp 2 x ep 2 x cp 2

Token-wise layers (embeddings, norms, MLPs, MoE and its router, the in / out projections, the LM head, the loss)
run on the rank's slice with no communication. A mixer that needs the whole sequence changes the split from
sequence to heads and back (c = this rank's index in the cp group):
    attention  q, k, v (b, L/C, heads, hd) on the slice  -> all-to-all ->  (b, L, heads/C, hd): KV heads
               c*nKV/C .. and the query heads they serve; the model's causal / packed attention on the whole
               sequence; all-to-all back to (b, L/C, nH, hd); o_proj on the slice. One all-to-all each way (q, k and
               v travel together, grouped by KV head).
    Mamba-2    in_proj on the slice; x and dt (by head) and B, C (by group, G/C groups a rank) all-to-all to the
               whole sequence; the causal conv (the rank's channels of conv1d), the SSD scan (its heads' A, D,
               dt_bias) on the whole sequence; y all-to-all back by sequence; the gated norm (per token, grouped
               over all heads, so it runs after the way back, where every rank has whole groups) and out_proj on the
               slice. z never travels. When n_groups % C != 0 each rank receives every group of B and C (an
               all-gather, made of the same all-to-all with the groups repeated C times) and takes its heads' groups.
So packed rows (position_ids) need nothing more: after the all-to-all every rank sees whole rows, and the model hands
the mixers seq_idx of the whole row. The model is told by one argument, `seq_shard` (this rank's slice of a
whole-row tensor), which a forward pre-hook installed here passes to every cache-less call: the model computes the
packed-sequence index, the shifted targets and MTP's tokens t+k on whole rows, then slices them.
Loss and statistics: LMLoss counts whole rows, and the trainer sums those counts over the ranks that read different
rows (dp x ep, not cp); each rank's loss is its slice's summed loss over those global totals, and the gradients,
metrics and expert loads (the aux-loss-free bias update) are summed over every rank, cp included (the tokens metric
counts L/C tokens a rank). The sequence aux loss sums each sequence's top-K counts over the cp group (its P term is a
sum over tokens, which the ranks' shares add up to).
Requirements: C divides num_key_value_heads (each rank attends with whole KV heads; replicating KV heads instead is
left out) and mamba_num_heads, and the sequence length; cache-less, unpadded forwards (the trainer's). Calls with a
cache (generation) run whole sequences through the plain mixers. Left out: --cp with --tp, load balancing of the
causal work (Megatron's zig-zag order: here rank C-1 holds the costliest queries, but with Ulysses every rank
attends over the whole sequence for its heads, so the work is even anyway).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd

from ..model.attention import Attention
from ..model.mamba2 import Mamba2Mixer, causal_conv_silu, ssd_chunked


def check_context_parallel(config, cp: int) -> None:
    """ValueError naming the fix when the model's heads cannot be split over cp ranks."""
    for field, n in (("num_key_value_heads", config.num_key_value_heads), ("mamba_num_heads", config.mamba_num_heads)):
        if n % cp:
            raise ValueError(f"--cp {cp} does not divide {field}={n} (each cp rank computes whole heads of the "
                             f"whole sequence); use a cp that divides it.")


def sequence_slice(t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """The rank's consecutive L/size positions of a whole-row (b, L, ...) tensor."""
    L = t.shape[1]
    if L % size:
        raise ValueError(f"--cp {size} does not divide the rows' length {L} (pretraining rows hold --seq-len + 1 "
                         f"tokens); use a length that is a multiple of {size}, e.g. --seq-len {L - 1 + (-L) % size}.")
    return t.narrow(1, rank * (L // size), L // size)


def heads_of_sequence(t: torch.Tensor, group) -> torch.Tensor:
    """(b, L/C, n, ...) this rank's slice of the sequence, all n heads -> (b, L, n/C, ...) the whole sequence, this
    rank's n/C heads (rank i's slice lands at positions i*L/C ..)."""
    C = dist.get_world_size(group)
    send = t.unflatten(2, (C, t.shape[2] // C)).movedim(2, 0).contiguous()     # (C, b, L/C, n/C, ...) j-th to rank j
    recv = all_to_all_single_autograd(send, None, None, group)                 # (C, b, L/C, n/C, ...) i-th from rank i
    return recv.movedim(0, 1).flatten(1, 2)                                    # (b, L, n/C, ...)


def sequence_of_heads(t: torch.Tensor, group) -> torch.Tensor:
    """The inverse of heads_of_sequence: (b, L, m, ...) this rank's heads -> (b, L/C, C*m, ...) all heads."""
    C = dist.get_world_size(group)
    send = t.unflatten(1, (C, t.shape[1] // C)).movedim(1, 0).contiguous()     # (C, b, L/C, m, ...) j-th to rank j
    recv = all_to_all_single_autograd(send, None, None, group)                 # (C, b, L/C, m, ...) heads of rank i
    return recv.movedim(0, 2).flatten(2, 3)                                    # (b, L/C, C*m, ...)


class ContextParallelAttention(Attention):
    """Attention whose cache-less forward takes this rank's slice of the sequence (x (b, L/C, d)) and seq_idx of
    the whole row; see the module docstring. Calls with a cache run the plain forward."""

    cp_group: dist.ProcessGroup

    def forward(self, x, mask=None, kv=None, pos=None, span=None, seq_idx=None):
        if kv is not None:
            return super().forward(x, mask, kv, pos, span, seq_idx)
        b, Lc, _ = x.shape
        nH, nKV, hd = self.num_heads, self.num_kv_heads, self.head_dim
        r = nH // nKV                                       # query heads per KV head
        q, k, v = (t.transpose(1, 2) for t in self._qkv(x))                   # (b, L/C, heads, hd)
        qkv = torch.cat([q.unflatten(2, (nKV, r)), k[:, :, :, None], v[:, :, :, None]], 3)   # (b, L/C, nKV, r+2, hd)
        qkv = heads_of_sequence(qkv, self.cp_group)                           # (b, L, nKV/C, r+2, hd)
        q, k, v = qkv.split([r, 1, 1], 3)
        q = q.flatten(2, 3).transpose(1, 2)                                   # (b, nH/C, L, hd)
        k, v = k[:, :, :, 0].transpose(1, 2), v[:, :, :, 0].transpose(1, 2)   # (b, nKV/C, L, hd)
        out = self.causal(q, k, v, seq_idx)                                   # (b, nH/C, L, hd)
        out = sequence_of_heads(out.transpose(1, 2), self.cp_group)           # (b, L/C, nH, hd)
        return self.o_proj(out.reshape(b, Lc, nH * hd))


class ContextParallelMamba(Mamba2Mixer):
    """Mamba2Mixer whose cache-less forward takes this rank's slice of the sequence (hidden (b, L/C, d)) and
    seq_idx of the whole row; see the module docstring. Calls with a cache run the plain forward."""

    cp_group: dist.ProcessGroup

    def forward(self, hidden, mask=None, conv_state=None, ssm_state=None, keep_states: bool = False, seq_idx=None):
        if conv_state is not None or ssm_state is not None:
            return super().forward(hidden, mask, conv_state, ssm_state, keep_states, seq_idx)
        group, C, c = self.cp_group, dist.get_world_size(self.cp_group), dist.get_rank(self.cp_group)
        b, Lc, _ = hidden.shape
        H, P, G, N = self.num_heads, self.head_dim, self.n_groups, self.ssm_state_size
        Hc, L = H // C, Lc * C
        heads = torch.arange(c * Hc, (c + 1) * Hc, device=hidden.device)     # this rank's heads
        z, xBC, dt_raw = self.in_proj(hidden).split([self.d_inner, self.conv_dim, H], dim=-1)
        x, B, Cm = xBC.split([self.d_inner, G * N, G * N], dim=-1)
        # 1. x and dt by head, B and C by group, to the whole sequence
        xdt = heads_of_sequence(torch.cat([x.view(b, Lc, H, P), dt_raw[..., None]], -1), group)   # (b, L, H/C, P+1)
        x, dt_raw = xdt.split([P, 1], -1)
        BC = torch.cat([B.view(b, Lc, G, N), Cm.view(b, Lc, G, N)], -1)       # (b, L/C, G, 2N)
        if G % C == 0:
            groups = torch.arange(c * G // C, (c + 1) * G // C, device=hidden.device)
        else:                        # all-gather: every group to every rank (the all-to-all of C copies of them)
            BC = BC[:, :, None].expand(b, Lc, C, G, 2 * N).flatten(2, 3)       # (b, L/C, C*G, 2N)
            groups = torch.arange(G, device=hidden.device)
        B, Cm = heads_of_sequence(BC, group).split([N, N], -1)               # (b, L, G', N) each
        # 2. the causal conv on this rank's channels of conv1d: x of its heads, B and C of its groups
        x_ch = (heads[:, None] * P + torch.arange(P, device=heads.device)).flatten()
        g_ch = (groups[:, None] * N + torch.arange(N, device=heads.device)).flatten()
        channels = torch.cat([x_ch, self.d_inner + g_ch, self.d_inner + G * N + g_ch])
        u = torch.cat([x.reshape(b, L, Hc * P), B.reshape(b, L, -1), Cm.reshape(b, L, -1)], -1)
        bias = None if self.conv1d.bias is None else self.conv1d.bias[channels]
        u = causal_conv_silu(u, self.conv1d.weight[channels, 0], bias, None, seq_idx)
        sdt = torch.promote_types(hidden.dtype, torch.float32)
        x, B, Cm = (t.contiguous() for t in u.to(sdt).split([Hc * P, len(g_ch), len(g_ch)], dim=-1))
        x, B, Cm = x.view(b, L, Hc, P), B.view(b, L, len(groups), N), Cm.view(b, L, len(groups), N)
        if G % C:                    # each local head's group: one for all when C % G == 0, else one per head
            head_group = heads // (H // G)
            pick = head_group[:1] if C % G == 0 else head_group
            B, Cm = B[:, :, pick].contiguous(), Cm[:, :, pick].contiguous()  # (b, L, 1 or H/C, N)
        # 3. the SSD scan of this rank's heads over the whole sequence
        hs = slice(c * Hc, (c + 1) * Hc)
        A = -torch.exp(self.A_log[hs].to(sdt))                                # (H/C,)
        dt = self._dt(dt_raw[..., 0], sdt, self.dt_bias[hs])                  # (b, L, H/C)
        Q = self.chunk_size if hidden.is_cuda else min(self.chunk_size, 64)
        y, _ = ssd_chunked(x, dt, A, B, Cm, Q, seq_idx=seq_idx)
        y = y + self.D[hs].to(sdt)[:, None] * x                               # (b, L, H/C, P)
        # 4. back to this rank's slice of the sequence, all heads; gated norm and out_proj per token
        y = sequence_of_heads(y, group).reshape(b, Lc, self.d_inner)
        return self.out_proj(self.norm(y, z).to(hidden.dtype))


def apply_context_parallel(model, cp_mesh) -> None:
    """In place: every attention and Mamba-2 mixer (MTP's too) becomes its context-parallel form over the 1-D
    `cp_mesh`, and a forward pre-hook hands every cache-less call of `model` the rank's `seq_shard`."""
    check_context_parallel(model.config, cp_mesh.size())
    group = cp_mesh.get_group()
    for module in model.modules():
        if isinstance(module, (Attention, Mamba2Mixer)):
            module.__class__ = ContextParallelAttention if isinstance(module, Attention) else ContextParallelMamba
            module.cp_group = group
    shard = functools.partial(sequence_slice, rank=cp_mesh.get_local_rank(), size=cp_mesh.size())

    def pass_shard(_module, args, kwargs):
        cache = args[2] if len(args) > 2 else kwargs.get("cache")
        return (args, kwargs) if cache is not None else (args, dict(kwargs, seq_shard=shard))

    model.register_forward_pre_hook(pass_shard, with_kwargs=True)
