"""HybridCache: the generation state of a hybrid model, allocated once (gpt-fast's static cache), with a position
per row (gpt-fast's `input_pos`, vLLM's per-sequence positions).

Per attention layer: K and V, (b, num_key_value_heads, max_len, head_dim) in the model dtype; row r holds its own
sequence at [0, pos[r]), so rows of different lengths share the buffer without padding and a forward writes row r's
new tokens at [pos[r], pos[r] + L). Per Mamba layer: the conv window, the last K-1 raw (pre-conv) x/B/C inputs
(b, K-1, conv_dim), and the SSM state (b, H, P, N) in float32. MoE and MLP layers hold nothing. The Mamba part is
constant in sequence length; only attention grows, and only up to max_len, so memory is bounded up front.

`pos` is a LongTensor (b,) on the cache's device. `rows(a, b)` is a view of a contiguous range of rows (writes go
to this cache), which is how the engine prefills one row or decodes only its live rows; `copy_row` forks a row's
whole state into others (a prompt prefilled once, sampled G times). `valid` (b, max_len) marks left-padding
positions of an HF-style padded batch prefill; it stays None when no row had padding (no mask needed at all).
MTP layers, when asked for, get their own entries after the main layers' (index num_hidden_layers + i).
"""

from __future__ import annotations

import torch


def select_mamba_states(layer_states: dict, mamba_states: dict, idx: torch.Tensor) -> None:
    """Set each Mamba layer's (conv, ssm) state, layer_states[i], to the one recorded after token idx[r] of row r
    (mamba_states[i] = (conv (b, L, K-1, C), ssm (b, L, H, P, N)) from a verify forward). Tensor ops only, so a
    compiled speculative round can run it inside its graph."""
    rows = torch.arange(len(idx), device=idx.device)
    for i, (conv, ssm) in mamba_states.items():
        layer_states[i][0].copy_(conv[rows, idx])
        layer_states[i][1].copy_(ssm[rows, idx])


class HybridCache:
    def __init__(self, config, batch_size: int, max_len: int, device=None, dtype=torch.float32,
                 include_mtp: bool = False, include_main: bool = True):
        self.batch_size, self.max_len = batch_size, max_len
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)    # tokens held, per row
        self.valid: torch.Tensor | None = None
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.conv: dict[int, torch.Tensor] = {}
        self.ssm: dict[int, torch.Tensor] = {}
        layers = list(config.layers_block_type)
        if include_mtp:
            layers += list(config.mtp_layers_block_type) * config.num_nextn_predict_layers
        kv_shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        for i, kind in enumerate(layers):
            if i < config.num_hidden_layers and not include_main:
                continue
            if kind == "full_attention":
                self.kv[i] = (torch.zeros(kv_shape, device=device, dtype=dtype),
                              torch.zeros(kv_shape, device=device, dtype=dtype))
            elif kind == "linear_attention":
                self.conv[i] = torch.zeros(batch_size, config.conv_kernel - 1, config.mamba_conv_dim,
                                           device=device, dtype=dtype)
                self.ssm[i] = torch.zeros(batch_size, config.mamba_num_heads, config.mamba_head_dim,
                                          config.ssm_state_size, device=device, dtype=torch.float32)

    @classmethod
    def _view(cls, src: "HybridCache", a: int, b: int) -> "HybridCache":
        view = cls.__new__(cls)
        view.batch_size, view.max_len = b - a, src.max_len
        view.pos = src.pos[a:b]
        view.valid = None if src.valid is None else src.valid[a:b]
        view.kv = {i: (k[a:b], v[a:b]) for i, (k, v) in src.kv.items()}
        view.conv = {i: t[a:b] for i, t in src.conv.items()}
        view.ssm = {i: t[a:b] for i, t in src.ssm.items()}
        return view

    def rows(self, a: int, b: int) -> "HybridCache":
        """Rows [a, b) as a cache of batch b - a whose tensors are views of this one (a forward on it updates this
        cache in place). Padding masks are per batch prefill and are not carried into views."""
        if not 0 <= a < b <= self.batch_size:
            raise ValueError(f"rows({a}, {b}) is outside this cache's {self.batch_size} rows.")
        return HybridCache._view(self, a, b)

    # ---- positions -----------------------------------------------------------------------------------------------
    def reserve(self, length: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Check that `length` more tokens fit in every row, record the padding `mask` (b, length) of a batch
        prefill, and return the positions they start at (b,). The forward advances `pos` afterwards (advance)."""
        end = int(self.pos.max()) + length
        if end > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} tokens per row and a row already has "
                             f"{end - length}; {length} more do not fit. Allocate a larger cache "
                             f"(HybridCache(..., max_len=...) / model.new_cache(batch, max_len)).")
        if mask is not None:
            if bool((self.pos != self.pos[0]).any()):
                raise ValueError("a padded batch (attention_mask with zeros) can only be prefilled while all rows "
                                 "are at the same position; prefill rows of different lengths one by one.")
            p = int(self.pos[0])
            if self.valid is None:
                self.valid = torch.ones(self.batch_size, self.max_len, dtype=torch.bool, device=mask.device)
            self.valid[:, p:p + length] = mask.bool()
        elif self.valid is not None:
            for r, p in enumerate(self.pos.tolist()):
                self.valid[r, p:p + length] = True
        return self.pos

    def advance(self, counts) -> None:
        """pos += counts (an int, or a LongTensor (b,) of per-row counts)."""
        self.pos += counts

    def layer_state(self, layer_idx: int) -> tuple:
        """This layer's tensors: (conv, ssm) for Mamba, (k, v, valid) for attention, () for MoE / MLP."""
        if layer_idx in self.ssm:
            return self.conv[layer_idx], self.ssm[layer_idx]
        if layer_idx in self.kv:
            k, v = self.kv[layer_idx]
            return k, v, self.valid
        return ()

    # ---- speculative rollback --------------------------------------------------------------------------------
    def keep_prefix(self, start: torch.Tensor, keep: torch.Tensor, mamba_states: dict) -> None:
        """After a verify pass over L tokens that began at positions `start` (b,), keep the first `keep` (b,) >= 1
        tokens of each row: Mamba layers take the state recorded after token keep-1 (mamba_states[layer] =
        (conv (b, L, K-1, C), ssm (b, L, H, P, N)) from the forward); attention only moves pos back (the K/V written
        past it are never read and get overwritten)."""
        select_mamba_states({i: (self.conv[i], self.ssm[i]) for i in mamba_states}, mamba_states, keep - 1)
        self.pos.copy_(start + keep)

    # ---- rows as sequences -------------------------------------------------------------------------------------
    def copy_row(self, src: int, dst: list[int] | range, length: int | None = None) -> None:
        """Fork row `src` into rows `dst`: the conv / SSM state, the first `length` (default: all it holds) K/V
        positions and pos. Rows of other caches are not touched."""
        n = int(self.pos[src]) if length is None else length
        for d in dst:
            if d == src:
                continue
            for k, v in self.kv.values():
                k[d, :, :n] = k[src, :, :n]
                v[d, :, :n] = v[src, :, :n]
            for t in (*self.conv.values(), *self.ssm.values()):
                t[d] = t[src]
            self.pos[d] = self.pos[src]
            if self.valid is not None:
                self.valid[d] = self.valid[src]

    def reset_rows(self, a: int, b: int) -> None:
        """Empty rows [a, b) (a new sequence starts there): pos 0, zero Mamba state. K/V need no clearing."""
        self.pos[a:b] = 0
        for t in (*self.conv.values(), *self.ssm.values()):
            t[a:b].zero_()
        if self.valid is not None:
            self.valid[a:b] = True

    def nbytes(self) -> int:
        tensors = [t for kv in self.kv.values() for t in kv] + list(self.conv.values()) + list(self.ssm.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def reset(self) -> None:
        self.valid = None
        self.reset_rows(0, self.batch_size)
