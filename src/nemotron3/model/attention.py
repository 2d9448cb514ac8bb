"""Grouped-query self-attention with no positional encoding (the paper drops RoPE), through SDPA.

q, k, v = x Wq, x Wk, x Wv;  out = softmax(q k^T / sqrt(hd) + mask) v Wo, with num_key_value_heads KV heads each
serving num_attention_heads / num_key_value_heads query heads (KV head j serves q heads j*n_rep .. j*n_rep+n_rep-1,
as HF's repeat_kv). Order comes from the causal mask and the Mamba layers alone. No biases (HF ignores
attention_bias too). With a HybridCache the new K/V are written into its static buffers at `pos` and attention
reads [0, pos+L); padded prompt positions stay masked for every later token. Packed rows (seq_idx, no cache) get a
block-diagonal causal mask: a token attends only to earlier tokens of its own packed sequence.

A query row that is itself padding sees only itself (so no row is all -inf); its output is never read.
"""

import torch
import torch.nn.functional as F
from torch import nn


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

    def forward(self, x, mask=None, kv=None, pos: int = 0, seq_idx=None):
        """x: (b, L, d). mask: (b, L) key padding (0 = pad) of the new tokens, or None. kv: (k_cache, v_cache,
        valid) of a HybridCache, each (b, nKV, T_max, hd) / (b, T_max), written at [pos, pos+L).
        seq_idx: (b, L) packed-sequence numbers (cache-less calls only), or None."""
        b, L, _ = x.shape
        q = self.q_proj(x).view(b, L, self.num_heads, self.head_dim).transpose(1, 2)       # (b, nH, L, hd)
        k = self.k_proj(x).view(b, L, self.num_kv_heads, self.head_dim).transpose(1, 2)    # (b, nKV, L, hd)
        v = self.v_proj(x).view(b, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        valid = mask.bool() if mask is not None else None                                  # (b, L) or None
        if kv is not None:     # valid_cache is None when no prompt row has padding (no mask needed, no sync)
            k_cache, v_cache, valid_cache = kv
            k_cache[:, :, pos:pos + L] = k
            v_cache[:, :, pos:pos + L] = v
            k, v = k_cache[:, :, :pos + L], v_cache[:, :, :pos + L]
            valid = None if valid_cache is None else valid_cache[:, :pos + L]
        attn_mask, is_causal = None, False
        if valid is None and seq_idx is None and (pos == 0 or L == 1):
            is_causal = L > 1                      # plain causal prefill, or one new token that sees everything
        else:
            rows = torch.arange(pos, pos + L, device=x.device)[:, None]
            cols = torch.arange(pos + L, device=x.device)[None, :]
            attn_mask = (cols <= rows)[None, None]                                         # (1, 1, L, T) causal
            if seq_idx is not None:      # block-diagonal: query t sees key s only within its own packed sequence
                attn_mask = attn_mask & (seq_idx[:, :, None] == seq_idx[:, None, :])[:, None]   # (b, 1, L, L)
            if valid is not None:
                attn_mask = (attn_mask & valid[:, None, None, :]) | (cols == rows)[None, None]
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout,
                                             enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, L, self.num_heads * self.head_dim))

    def step_static(self, x, k_cache, v_cache, valid, pos_t):
        """One token at position pos_t (0-d tensor) with static shapes for torch.compile: write K/V with index_copy_,
        attend over the whole buffer with positions > pos_t (and padding) masked out. Same result as forward."""
        b = x.shape[0]
        q = self.q_proj(x).view(b, 1, self.num_heads, self.head_dim).transpose(1, 2)           # (b, nH, 1, hd)
        k = self.k_proj(x).view(b, 1, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, 1, self.num_kv_heads, self.head_dim).transpose(1, 2)
        k_cache.index_copy_(2, pos_t.view(1), k)
        v_cache.index_copy_(2, pos_t.view(1), v)
        keep = torch.arange(k_cache.shape[2], device=x.device) <= pos_t                         # (T,)
        keep = keep[None, None, None, :] if valid is None else (keep & valid)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=keep,
                                             enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, 1, self.num_heads * self.head_dim))
