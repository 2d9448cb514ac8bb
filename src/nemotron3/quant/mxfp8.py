"""MXFP8 (OCP MX): E4M3 elements with one power-of-two (E8M0) scale per 32 consecutive elements, no tensor scale.
Nemotron 3 runs the Mamba output projections in MXFP8 because NVFP4 flushed up to 40% of their values to zero.

Scale as Transformer Engine and the MXFP8 training recipe compute it (nvfp4.md §1.7; torchao's RCEIL mode):
    e = ceil(log2(fl(amax_b * fl(1/448))))        # rounded *up*, so the block's amax never saturates
    x̂_i = e4m3_rne(x_i * 2^-e) * 2^e             # power-of-two scaling is exact
amax_b == 0 gives the smallest scale 2^-127 (the block stays zero). NaN/inf propagate to the block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .nvfp4 import E4M3_MAX, _f32


def e8m0_exponent_ceil(v: torch.Tensor) -> torch.Tensor:
    """Smallest e with 2^e >= v (v >= 0, fp32), clamped to E8M0's [-127, 127]; 0 -> -127."""
    mant, exp = torch.frexp(v)                       # v = mant * 2^exp, mant in [0.5, 1)
    e = torch.where(mant == 0.5, exp - 1, exp)       # an exact power of two keeps its exponent
    e = torch.where(v == 0, -127, e)
    return e.clamp(-127, 127)


def mxfp8_quantize(x: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 element values as fp32 in x's shape, per-block exponents e (int32, (rows, C/32))), blocks along the last
    dim; a partial last block is padded with zeros."""
    C = x.shape[-1]
    xb = F.pad(x.float().reshape(-1, C), (0, -C % block)).unflatten(-1, (-1, block))
    amax_b = xb.abs().amax(-1, keepdim=True)
    e = e8m0_exponent_ceil(amax_b * _f32(1 / E4M3_MAX, xb))
    data = torch.ldexp(xb, -e.float()).clamp(-E4M3_MAX, E4M3_MAX)
    data = data.to(torch.float8_e4m3fn).float() + (amax_b - amax_b)      # inf/NaN in a block -> NaN block
    return data.flatten(1)[:, :C].reshape(x.shape), e.squeeze(-1).int()


def mxfp8_fake_quantize(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Quantize x to MXFP8 (blocks of 32 along the last dim) and back; same shape and dtype."""
    data, e = mxfp8_quantize(x, block)
    C = x.shape[-1]
    scale = torch.ldexp(torch.ones_like(e, dtype=torch.float32), e.float()).repeat_interleave(block, -1)[:, :C]
    return (data.reshape(-1, C) * scale).reshape(x.shape).to(x.dtype)
