"""HybridCache: the generation state of a hybrid model, allocated once (gpt-fast's static cache).

Per attention layer: K and V, (b, num_key_value_heads, max_len, head_dim) in the model dtype, written at
positions [pos, pos+L). Per Mamba layer: the conv window, the last K-1 raw (pre-conv) x/B/C inputs
(b, K-1, conv_dim), and the SSM state (b, H, P, N) in float32. MoE and MLP layers hold nothing. The Mamba part is
constant in sequence length; only attention grows, and only up to max_len, so memory is bounded up front.

`valid` (b, max_len) records which prompt positions were padding so that every later token keeps ignoring them;
it is None while no row had padding (then attention needs no mask at all). MTP layers, when asked for, get their own
entries after the main layers' (index num_hidden_layers + i), for drafting in the inference engine.
"""

from __future__ import annotations

import torch


class HybridCache:
    def __init__(self, config, batch_size: int, max_len: int, device=None, dtype=torch.float32,
                 include_mtp: bool = False, include_main: bool = True):
        self.batch_size, self.max_len = batch_size, max_len
        self.pos = 0                              # tokens already in the cache (same for every row: left padding)
        self.valid: torch.Tensor | None = None
        # speculative verification: when a dict, Mamba layers run token by token and append their (conv, ssm) state
        # after every token here, so rollback() can keep any accepted prefix exactly (nemotron3_spec.md §2.5)
        self.history: dict[int, list] | None = None
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

    def record_padding(self, mask: torch.Tensor | None, length: int) -> None:
        """Mark the next `length` positions valid (mask None) or as `mask` (b, length) says."""
        if self.pos + length > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} tokens and already has {self.pos}; {length} more do "
                             f"not fit. Allocate HybridCache(..., max_len=...) large enough for prompt + new tokens.")
        if mask is None or (self.valid is None and bool(mask.all())):
            if self.valid is not None:
                self.valid[:, self.pos:self.pos + length] = True
            return
        if self.valid is None:
            self.valid = torch.ones(self.batch_size, self.max_len, dtype=torch.bool, device=mask.device)
        self.valid[:, self.pos:self.pos + length] = mask.bool()

    def layer_state(self, layer_idx: int) -> tuple:
        """This layer's tensors: (conv, ssm) for Mamba, (k, v, valid) for attention, () for MoE / MLP."""
        if layer_idx in self.ssm:
            return self.conv[layer_idx], self.ssm[layer_idx]
        if layer_idx in self.kv:
            return self.attention_kv(layer_idx)
        return ()

    def attention_kv(self, layer_idx: int):
        k, v = self.kv[layer_idx]
        return k, v, self.valid

    def start_history(self) -> int:
        """Begin recording per-token Mamba states for a verify pass; returns the position it starts from."""
        self.history = {}
        return self.pos

    def rollback(self, start: int, keep: int) -> None:
        """After a verify pass that began at `start`, keep its first `keep` tokens (>= 1): Mamba layers take the
        state recorded after token keep-1; attention just moves `pos` back (later K/V are overwritten, never read)."""
        for i, states in (self.history or {}).items():
            conv, ssm = states[keep - 1]
            self.conv[i].copy_(conv)
            self.ssm[i].copy_(ssm)
        self.history = None
        self.pos = start + keep

    def nbytes(self) -> int:
        tensors = [t for kv in self.kv.values() for t in kv] + list(self.conv.values()) + list(self.ssm.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def reset(self) -> None:
        self.pos, self.valid = 0, None
        for t in [t for kv in self.kv.values() for t in kv] + list(self.conv.values()) + list(self.ssm.values()):
            t.zero_()
