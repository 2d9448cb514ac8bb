"""RMSNorm and the gated, grouped RMSNorm of the Mamba-2 mixer.

RMSNorm(x) = w * x / sqrt(mean(x^2) + eps), computed in float32 and cast back (HF NemotronHRMSNorm: the weight
multiply is in float32 too). The gated norm is Mamba-2's `norm_before_gate=False` form: gate first,
g = y * silu(z), then an RMSNorm over each of the G groups of width H*P/G, then the weight (multiplied in the input
dtype, as HF does). Nothing here is learned beyond the per-channel weight.
"""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float32, torch.float64) and self.weight.dtype == x.dtype:   # one fused op
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        ct = torch.promote_types(x.dtype, torch.float32)          # at least float32 (float64 stays float64)
        xf = x.to(ct)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.to(ct) * xf).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """y -> w * rmsnorm_per_group(y * silu(z)); groups of size H*P/G along the last dim."""

    def __init__(self, hidden_size: int, n_groups: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.n_groups = n_groups
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        ct = torch.promote_types(dtype, torch.float32)
        g = y.to(ct) * F.silu(z.to(ct))
        g = g.unflatten(-1, (self.n_groups, -1))                                  # (..., G, H*P/G)
        g = F.rms_norm(g, g.shape[-1:], None, self.eps)
        return self.weight * g.flatten(-2).to(dtype)
