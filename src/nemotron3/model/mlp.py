"""The relu² MLP: down_proj(relu(up_proj(x))^2), no gate projection (Nemotron-H, Primer's squared ReLU).

Used for dense '-' layers (width intermediate_size) and for the MoE shared expert (moe_shared_expert_intermediate_size).
"""

import torch
from torch import nn


def relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x).square()


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(relu2(self.up_proj(x)))
