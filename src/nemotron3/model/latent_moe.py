"""LatentMoE (Nemotron 3 white paper §2.2; LatentMoE, arXiv 2601.18089 §3): route in d, run the experts in l < d.

    s, ids, w = Router(x)                         # router sees the full-width x (d)
    z         = W_down x                          # fc1_latent_proj: d -> l, no bias, no norm
    y_lat     = sum_k w_k E_{id_k}(z)             # experts (m x l, l x m) live entirely in the latent width
    out       = W_up y_lat + Shared(x)            # fc2_latent_proj: l -> d; the shared expert stays in d

Each routed token moves l numbers instead of d (dispatch/combine and expert weight bytes shrink by d/l), which the
paper reinvests in d/l times more experts and a d/l times larger top-k. Names follow the HF checkpoint
(`mixer.fc1_latent_proj.weight [l, d]`, `mixer.fc2_latent_proj.weight [d, l]`).
"""

import torch
from torch import nn

from .moe import MoE


class LatentMoE(MoE):
    def __init__(self, config, layer_idx: int = 0):
        super().__init__(config, layer_idx)
        self.fc1_latent_proj = nn.Linear(config.hidden_size, config.moe_latent_size, bias=config.mlp_bias)
        self.fc2_latent_proj = nn.Linear(config.moe_latent_size, config.hidden_size, bias=config.mlp_bias)

    def route_and_run(self, x_TD: torch.Tensor, routing: dict | None = None, schedule: str = "sorted"):
        r = self.route(x_TD, routing)                         # routing logits from the full width d
        z_TL = self.fc1_latent_proj(x_TD)                     # (T, l)
        return self.fc2_latent_proj(self.experts(z_TL, r.ids_TK, r.weights_TK, schedule))


def build_moe(config, layer_idx: int = 0) -> MoE:
    return (LatentMoE if config.moe_latent_size else MoE)(config, layer_idx)
