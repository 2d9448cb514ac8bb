"""Multi-token prediction heads (DeepSeek-V3 style, hybrid inner block; nemotron3_spec.md §2.1). Not in HF.

For depth k = 1..D and position t, with h^0 = the main model's output after norm_f:
    u     = eh_proj([enorm(Embed(x_{t+k})) ; hnorm(h^{k-1}_t)])      # 2d -> d, the embedding half first
    u     = blocks(u)                                                 # the mtp_layers_block_type layers (Super: "*E")
    h^k_t = final_layernorm(u);   logits^k_t = lm_head(h^k_t)          # embedding and lm_head shared with the model
Checkpoint names are NVIDIA's flattened ones: mtp.layers.{block*len(pattern) + i}; the first layer of a block owns
enorm/hnorm/eh_proj, the last owns final_layernorm. `num_nextn_predict_layers` physical blocks exist; depth k uses
block min(k-1, n-1), so Super's single block is applied recursively for D=2 depths as it was trained (shared weights).
Positions t >= L-k have no x_{t+k}: their inputs are rolled-in padding (id 0) and the loss masks them. In a packed
row (seq_idx) the same holds at the end of every packed sequence: x_{t+k} of the next sequence is never read.
"""

from __future__ import annotations

import torch
from torch import nn

from .norm import RMSNorm


class MultiTokenPrediction(nn.Module):
    def __init__(self, config, block_factory):
        super().__init__()
        self.pattern = list(config.mtp_layers_block_type)
        self.num_blocks = config.num_nextn_predict_layers
        n_main, d, eps = config.num_hidden_layers, config.hidden_size, config.layer_norm_epsilon
        layers = []
        for j in range(self.num_blocks * len(self.pattern)):
            inner = j % len(self.pattern)
            layer = block_factory(config, n_main + j, self.pattern[inner])    # cache index after the main layers
            if inner == 0:
                layer.enorm, layer.hnorm = RMSNorm(d, eps), RMSNorm(d, eps)
                layer.eh_proj = nn.Linear(2 * d, d, bias=False)
            if inner == len(self.pattern) - 1:
                layer.final_layernorm = RMSNorm(d, eps)
            layers.append(layer)
        self.layers = nn.ModuleList(layers)

    def block_layers(self, depth: int):
        """Layers of the physical block used at depth `depth` (1-based)."""
        blk = min(depth - 1, self.num_blocks - 1)
        return self.layers[blk * len(self.pattern):(blk + 1) * len(self.pattern)]

    def step(self, depth: int, h_prev: torch.Tensor, e_next: torch.Tensor, mask=None, cache=None, pos=None,
             span=None, mamba_states=None, seq_idx=None, routing=None):
        """One depth: h^{k-1} (b, L, d) and Embed(x_{t+k}) (b, L, d) -> h^k (b, L, d), final-normed. With a cache
        (positions pos, host span as in Block.forward) the block continues the cached sequence."""
        layers = self.block_layers(depth)
        u = self._project(layers[0], h_prev, e_next)
        for layer in layers:
            u = layer(u, mask, cache, pos, span, mamba_states, seq_idx, routing)
        return layers[-1].final_layernorm(u)

    def step_static(self, depth: int, h_prev: torch.Tensor, e_next: torch.Tensor, states: dict, pos: torch.Tensor,
                    mamba_states: dict | None = None, compiled: bool = True) -> torch.Tensor:
        """step() for a few tokens per row at positions pos (b,) with static shapes (Block.step), for
        torch.compile; states maps a layer index to its HybridCache.layer_state. compiled: whether it runs inside
        torch.compile (False: an eager draft), which picks the MoE schedule."""
        layers = self.block_layers(depth)
        u = self._project(layers[0], h_prev, e_next)
        for layer in layers:
            u = layer.step(u, states[layer.layer_idx], pos, mamba_states, compiled)
        return layers[-1].final_layernorm(u)

    @staticmethod
    def _project(first, h_prev, e_next):
        """eh_proj([enorm(Embed(x_{t+k})) ; hnorm(h^{k-1}_t)]): 2d -> d, the embedding half first."""
        return first.eh_proj(torch.cat([first.enorm(e_next), first.hnorm(h_prev)], dim=-1))

    def forward(self, h_main: torch.Tensor, input_ids: torch.Tensor, embed: nn.Embedding, depths: int, mask=None,
                seq_idx=None, routing=None, seq_shard=None):
        """Hidden states of depths 1..depths over a whole sequence (training / teacher forcing). seq_idx (b, L):
        packed-sequence numbers, or None. routing: a dict receiving the MoE layers' RouterOutputs, or None.
        seq_shard (context parallelism): h_main holds this rank's slice of the sequence, input_ids and seq_idx the
        whole rows; the tokens t+k are looked up on the whole row, then sliced."""
        outs, h = [], h_main
        for k in range(1, depths + 1):
            ids_k = torch.roll(input_ids, shifts=-k, dims=1)
            ids_k[:, -k:] = 0                                                     # no token t+k past the end
            if seq_idx is not None:                                               # nor in the next packed sequence
                ids_k = ids_k.masked_fill(torch.roll(seq_idx, shifts=-k, dims=1) != seq_idx, 0)
            if seq_shard is not None:
                ids_k = seq_shard(ids_k)
            h = self.step(k, h, embed(ids_k), mask, seq_idx=seq_idx, routing=routing)
            outs.append(h)
        return outs
