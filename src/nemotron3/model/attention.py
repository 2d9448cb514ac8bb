"""Grouped-query self-attention with no positional encoding (the paper drops RoPE), through SDPA.

q, k, v = x Wq, x Wk, x Wv;  out = softmax(q k^T / sqrt(hd) + mask) v Wo, with num_key_value_heads KV heads each
serving num_attention_heads / num_key_value_heads query heads (KV head j serves q heads j*n_rep .. j*n_rep+n_rep-1,
as HF's repeat_kv). Order comes from the causal mask and the Mamba layers alone. No biases (HF ignores
attention_bias too). With a HybridCache, row r's new K/V are written at [pos[r], pos[r] + L) of its own buffer row
and its queries see keys j <= pos[r] + i (and no padded position of an HF-style left-padded prefill). Packed rows
(seq_idx, no cache) are block-diagonal causal: a token attends only to earlier tokens of its own sequence; each
sequence is attended alone by a causal SDPA on its own slice (packed_causal_attention), so no (L, L) mask is built
and CUDA keeps its flash kernels.

A query row that is itself padding sees only itself (so no row is all -inf); its output is never read.

A prefill chunk that continues a cache (every row at the same position p, no padding) never builds its (L, p + L)
mask: the keys split into the prefix [0, p), which every query sees, and the chunk itself, seen causally; each part
is attended alone with its log-sum-exp and the two merge exactly (flash attention's online softmax):
    out = (e^{l1 - m} o1 + e^{l2 - m} o2) / (e^{l1 - m} + e^{l2 - m}),  m = max(l1, l2)
so memory is set by the chunk, not by the context (prefix_causal_attention; measured on 2 CPU cores, 512 queries
over a 64K context: 0.40 s against 0.84 s for the mask and 0.96 s for a compiled flex_attention). On other devices
SDPA's lower-right causal bias does the same inside its fused kernels. A decode step (one token per row, all at the
same position) sees every cached key: its query heads stack per KV head (grouped_full_attention), so K/V are read
once and never expanded per query head.
Rows at different positions and padded batches keep the explicit (b, 1, L, T) mask.
"""

import torch
import torch.nn.functional as F
from torch import nn


def cached_attention_mask(pos: torch.Tensor, L: int, T: int, valid: torch.Tensor | None) -> torch.Tensor:
    """(b, 1, L, T) boolean: query i of row r (at position pos[r] + i) sees key j iff j <= pos[r] + i and j is not
    padding; every query sees itself."""
    q_pos = pos[:, None] + torch.arange(L, device=pos.device)                              # (b, L)
    cols = torch.arange(T, device=pos.device)
    keep = cols[None, None, :] <= q_pos[:, :, None]                                        # (b, L, T)
    if valid is not None:
        keep = (keep & valid[:, None, :T]) | (cols[None, None, :] == q_pos[:, :, None])
    return keep[:, None]


def _attention_with_lse(q, k, v, is_causal: bool):
    """(out (b, h, L, hd), logsumexp (b, h, L)) of softmax(q k^T / sqrt(hd)) v: CPU's fused flash kernel, which
    works in key blocks and never holds an (L, T) matrix."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal)


def grouped_full_attention(q, k, v) -> torch.Tensor:
    """Attention of every query over every key (no mask): the r query heads of a KV head stack into r*L queries of
    one head, so K/V are read once per KV head and never expanded (what SDPA's enable_gqa does on CPU: 2x slower
    decode at 256K). q (b, nH, L, hd); k, v (b, nKV, T, hd)."""
    b, nH, L, hd = q.shape
    nKV = k.shape[1]
    out = F.scaled_dot_product_attention(q.reshape(b, nKV, nH // nKV * L, hd), k, v)      # (b, nKV, r*L, hd)
    return out.reshape(b, nH, L, hd)


def prefix_causal_attention(q, k, v, prefix: int) -> torch.Tensor:
    """Attention of L queries at positions prefix .. prefix + L - 1 over keys 0 .. prefix + L - 1, causal within the
    last L. q (b, nH, L, hd); k, v (b, nKV, prefix + L, hd), KV head j serving query heads j*r .. j*r + r - 1."""
    b, nH, L, hd = q.shape
    nKV = k.shape[1]
    r = nH // nKV
    if q.device.type != "cpu":
        from torch.nn.attention.bias import causal_lower_right
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(L, k.shape[2]),
                                              enable_gqa=nKV != nH)
    # prefix: no mask, so the r query heads of a KV head stack into one of r*L queries (no K/V copy)
    o1, l1 = _attention_with_lse(q.reshape(b, nKV, r * L, hd), k[:, :, :prefix], v[:, :, :prefix], False)
    o1, l1 = o1.reshape(b, nH, L, hd), l1.reshape(b, nH, L)
    kd, vd = k[:, :, prefix:].repeat_interleave(r, 1), v[:, :, prefix:].repeat_interleave(r, 1)   # (b, nH, L, hd)
    o2, l2 = _attention_with_lse(q, kd, vd, True)
    m = torch.maximum(l1, l2)
    w1, w2 = (l1 - m).exp()[..., None], (l2 - m).exp()[..., None]                           # (b, nH, L, 1)
    return ((w1 * o1 + w2 * o2) / (w1 + w2)).to(q.dtype)


def packed_sequence_lengths(seq_idx: torch.Tensor) -> list[list[int]]:
    """Per row of seq_idx (b, L), the lengths of its packed sequences in order (one host sync)."""
    L = seq_idx.shape[1]
    starts = torch.ones_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]                                       # (b, L)
    out = []
    for row in starts.tolist():
        cuts = [t for t, s in enumerate(row) if s] + [L]
        out.append([e - a for a, e in zip(cuts, cuts[1:])])
    return out


def packed_causal_attention(q, k, v, seq_idx: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Block-diagonal causal attention of packed rows: each sequence of seq_idx (b, L) attends causally within
    itself. q (b, nH, L, hd); k, v (b, nKV, L, hd). One causal SDPA per sequence on its slice (memory of the
    longest sequence, never (L, L)). Rows are cut with split and joined with cat, whose backward passes are one
    copy each (slicing or writing per sequence would move the whole gradient once per sequence)."""
    gqa = k.shape[1] != q.shape[1]
    rows = []
    for r, sizes in enumerate(packed_sequence_lengths(seq_idx)):
        parts = zip(*(t[r:r + 1].split(sizes, dim=2) for t in (q, k, v)))
        rows.append(torch.cat([F.scaled_dot_product_attention(qs, ks, vs, is_causal=qs.shape[2] > 1,
                                                              dropout_p=dropout_p, enable_gqa=gqa)
                               for qs, ks, vs in parts], dim=2))                            # (1, nH, L, hd)
    return torch.cat(rows, dim=0)                                                           # (b, nH, L, hd)


class Attention(nn.Module):
    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)
        self.dropout = config.attention_dropout

    def _qkv(self, x):
        b, L, _ = x.shape
        q = self.q_proj(x).view(b, L, self.num_heads, self.head_dim).transpose(1, 2)       # (b, nH, L, hd)
        k = self.k_proj(x).view(b, L, self.num_kv_heads, self.head_dim).transpose(1, 2)    # (b, nKV, L, hd)
        v = self.v_proj(x).view(b, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def _out(self, q, k, v, attn_mask=None, is_causal=False):
        b, _, L, _ = q.shape
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout,
                                             enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, L, self.num_heads * self.head_dim))

    def causal(self, q, k, v, seq_idx=None) -> torch.Tensor:
        """Causal attention of whole cache-less rows, block-diagonal per packed sequence when seq_idx (b, L) is
        given (one causal SDPA per sequence). q (b, nH, L, hd); k, v (b, nKV, L, hd) -> (b, nH, L, hd). Context
        parallelism (train/context_parallel.py) calls it with one rank's heads of the whole sequence."""
        dropout = self.dropout if self.training else 0.0
        if seq_idx is not None:
            return packed_causal_attention(q, k, v, seq_idx, dropout)
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, dropout_p=dropout,
                                              enable_gqa=k.shape[1] != q.shape[1])

    def forward(self, x, mask=None, kv=None, pos: torch.Tensor | None = None, span: tuple[int, int] | None = None,
                seq_idx=None):
        """x: (b, L, d). mask: (b, L) key padding (0 = pad) of the new tokens, or None. kv: (k_cache, v_cache,
        valid) of a HybridCache, each (b, nKV, T_max, hd) / (b, T_max); pos (b,) the rows' positions and span the
        host-side (min, max) of pos (the caller reads it once per forward, so layers add no device syncs).
        seq_idx: (b, L) packed-sequence numbers (cache-less calls only), or None."""
        b, L, _ = x.shape
        q, k, v = self._qkv(x)
        if kv is None:
            if mask is None:
                out = self.causal(q, k, v, seq_idx)
                return self.o_proj(out.transpose(1, 2).reshape(b, L, self.num_heads * self.head_dim))
            keep = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()[None]            # (1, L, L) causal
            if seq_idx is not None:      # block-diagonal: query t sees key s only within its own packed sequence
                keep = keep & (seq_idx[:, :, None] == seq_idx[:, None, :])                    # (b, L, L)
            if mask is not None:
                keep = keep & mask.bool()[:, None, :]
            eye = torch.eye(L, dtype=torch.bool, device=x.device)
            return self._out(q, k, v, attn_mask=(keep | eye)[:, None])
        k_cache, v_cache, valid = kv
        lo, hi = span
        if lo == hi:                                      # every row at the same position: slice writes
            k_cache[:, :, lo:lo + L] = k
            v_cache[:, :, lo:lo + L] = v
        else:                                             # row r writes at pos[r] .. pos[r] + L - 1
            self._scatter_kv(k_cache, v_cache, k, v, pos)
        T = hi + L
        k, v = k_cache[:, :, :T], v_cache[:, :, :T]
        if valid is None and lo == hi and lo == 0:
            return self._out(q, k, v, is_causal=L > 1)    # plain causal prefill
        if valid is None and lo == hi and L == 1:          # one token per row that sees everything (decode)
            out = grouped_full_attention(q, k, v)
            return self.o_proj(out.transpose(1, 2).reshape(b, L, self.num_heads * self.head_dim))
        if valid is None and lo == hi and not (self.training and self.dropout):   # a chunk continuing the cache
            out = prefix_causal_attention(q, k, v, lo)
            return self.o_proj(out.transpose(1, 2).reshape(b, L, self.num_heads * self.head_dim))
        return self._out(q, k, v, attn_mask=cached_attention_mask(pos, L, T, valid))

    @staticmethod
    def _scatter_kv(k_cache, v_cache, k, v, pos):
        b, _, L, _ = k.shape
        rows = torch.arange(b, device=k.device)[:, None].expand(b, L)                     # (b, L)
        cols = pos[:, None] + torch.arange(L, device=k.device)                            # (b, L)
        k_cache[rows, :, cols] = k.transpose(1, 2)                                         # (b, L, nKV, hd)
        v_cache[rows, :, cols] = v.transpose(1, 2)

    def step_static(self, x, k_cache, v_cache, valid, pos):
        """L tokens per row at positions pos (b,) with static shapes for torch.compile: K/V written by index, the
        whole buffer attended under the position mask (gpt-fast's scheme). Same result as forward."""
        q, k, v = self._qkv(x)
        self._scatter_kv(k_cache, v_cache, k, v, pos)
        return self._out(q, k_cache, v_cache, attn_mask=cached_attention_mask(pos, x.shape[1], k_cache.shape[2], valid))
