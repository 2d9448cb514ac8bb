"""A linear layer whose three GEMMs run in NVFP4 (or MXFP8), emulated exactly: one autograd.Function.

Y = X W^T with X (M, K) tokens x in-features and W (N, K). Per GEMM, per operand (nvfp4.md §2.1, TE's recipe):

    fprop  Y  = Q(X; 1x16 along K)            Q(W; 16x16 tiles)^T
    dgrad  dX = Q(dY; 1x16 along N, SR)       Q(W; the same 16x16 tiles)          # Q(W)^T == Q(W^T) with 2D tiles
    wgrad  dW = Q(dY^T H; 1x16 along M, SR)   Q(X^T H; 1x16 along M)^T            # H: random Hadamard, cancels

SR = stochastic rounding (gradients only), H = the 16-point random Hadamard transform (wgrad only). Each operand
is quantized from the high-precision tensor with its own amax. The GEMM multiplies the exact q*s_b operands in
fp32 and applies both tensor scales after (TE's alpha), so only the accumulation order differs from Blackwell.
MXFP8 (Mamba out_proj in Nemotron 3): 1x32 blocks along each GEMM's reduction dim, RNE, no RHT; W and W^T are
quantized separately (MX has no 2D tiles). Bias, norms and everything outside the GEMMs stay in high precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .hadamard import TE_SIGNS, random_hadamard_transform
from .mxfp8 import mxfp8_fake_quantize
from .nvfp4 import nvfp4_quantize


@dataclass(frozen=True)
class GemmFormat:
    """How one linear layer's GEMMs are quantized."""
    format: str = "nvfp4"                 # nvfp4 | mxfp8
    rht: bool = True                      # random Hadamard transform on both wgrad operands (nvfp4)
    stochastic_rounding: bool = True      # SR of the gradient operands in dgrad and wgrad (nvfp4)
    weight_tile_2d: bool = True           # 16x16 weight tiles (nvfp4); False: 1x16, W and W^T quantized separately
    signs: tuple = TE_SIGNS               # the Hadamard sign vector
    fused: bool = False                   # quantize with one torch.compile'd graph (GPUs; same values)

    def __post_init__(self):
        if self.format not in ("nvfp4", "mxfp8"):
            raise ValueError(f"GemmFormat.format={self.format!r}: use 'nvfp4' or 'mxfp8'.")


class QuantStats:
    """Running means of a layer's quantization statistics, kept as tensors (no host sync until summary())."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, key: str, value: torch.Tensor) -> None:
        self.sums[key] = self.sums.get(key, 0) + value.detach().float()
        self.counts[key] = self.counts.get(key, 0) + 1

    def summary(self, reset: bool = True) -> dict[str, float]:
        out = {k: float(v) / self.counts[k] for k, v in self.sums.items()}
        if reset:
            self.sums, self.counts = {}, {}
        return out


def _quantize(t: torch.Tensor, fmt: GemmFormat, tile, stochastic: bool, generator, stats, name: str):
    """(GEMM operand in fp32, tensor scale to apply after the GEMM). Records flush-to-zero (share of nonzero
    inputs that dequantize to 0) and relative error when stats is given."""
    if fmt.format == "nvfp4":
        qt = nvfp4_quantize(t, tile, stochastic and fmt.stochastic_rounding, generator, fmt.fused)
        op, scale = qt.gemm_operand(), qt.tensor_scale
    else:
        op, scale = mxfp8_fake_quantize(t.float()), torch.ones((), device=t.device)
    if stats is not None:
        nonzero = t != 0
        stats.add(f"ftz_{name}", ((op == 0) & nonzero).sum() / nonzero.sum().clamp(min=1))
        stats.add(f"err_{name}", torch.linalg.vector_norm(op * scale - t.float())
                  / torch.linalg.vector_norm(t.float()).clamp(min=1e-30))
    return op, scale


class _QuantizedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, fmt: GemmFormat, generator, stats):
        device = x.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            x2 = x.reshape(-1, x.shape[-1])
            xq, sx = _quantize(x2, fmt, (1, 16), False, generator, stats, "act")
            tile = (16, 16) if fmt.format == "nvfp4" and fmt.weight_tile_2d else (1, 16)
            wq, sw = _quantize(weight, fmt, tile, False, generator, stats, "weight")
            y = (xq @ wq.t()) * (sx * sw)
            if bias is not None:
                y = y + bias.float()
        reuse_w = tile == (16, 16)
        ctx.save_for_backward(x2, weight, wq if reuse_w else None, sw if reuse_w else None)
        ctx.fmt, ctx.generator, ctx.stats, ctx.x_shape, ctx.has_bias = fmt, generator, stats, x.shape, bias is not None
        return y.to(out_dtype).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, wq, sw = ctx.saved_tensors
        fmt, gen, stats = ctx.fmt, ctx.generator, ctx.stats
        dy2 = dy.reshape(-1, dy.shape[-1]).float()
        dx = dw = db = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:                        # dgrad: dX = dY W, reduction over N
                gq, sg = _quantize(dy2, fmt, (1, 16), True, gen, stats, "grad")
                if wq is None:                                 # 1x16 / MX: quantize W^T along N on its own
                    wq, sw = _quantize(weight.t(), fmt, (1, 16), False, gen, None, "")
                    wq = wq.t()
                dx = ((gq @ wq) * (sg * sw)).to(x2.dtype).view(ctx.x_shape)
            if ctx.needs_input_grad[1]:                        # wgrad: dW = dY^T X, reduction over M (tokens)
                dyT, xT = dy2.t(), x2.float().t()
                if fmt.format == "nvfp4" and fmt.rht:
                    dyT, xT = random_hadamard_transform(dyT, fmt.signs), random_hadamard_transform(xT, fmt.signs)
                gq2, sg2 = _quantize(dyT, fmt, (1, 16), True, gen, None, "")
                xq2, sx2 = _quantize(xT, fmt, (1, 16), False, gen, None, "")
                dw = ((gq2 @ xq2.t()) * (sg2 * sx2)).to(weight.dtype)
                if stats is not None:
                    stats.add("wgrad_zero", (dw == 0).float().mean())
            if ctx.has_bias and ctx.needs_input_grad[2]:
                db = dy2.sum(0)
        return dx, dw, db, None, None, None


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     fmt: GemmFormat = GemmFormat(), generator: torch.Generator | None = None,
                     stats: QuantStats | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) with fprop, dgrad and wgrad in `fmt` (module docstring)."""
    return _QuantizedLinearFn.apply(x, weight, bias, fmt, generator, stats)


class QuantLinear(nn.Linear):
    """nn.Linear computed by quantized_linear; same parameters (shared, not copied) and state-dict names, so
    checkpoints and optimizers see no difference. `monitor = True` records statistics into `stats`."""

    def __init__(self, linear: nn.Linear, fmt: GemmFormat, generator: torch.Generator | None = None):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias
        self.fmt, self.generator, self.stats, self.monitor = fmt, generator, QuantStats(), False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.weight, self.bias, fmt=self.fmt, generator=self.generator,
                                stats=self.stats if self.monitor else None)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", format={self.fmt.format}"


class QuantExpertLinear:
    """The per-expert F.linear of a routed-experts module (model/moe.py `Experts.linear`), quantized per expert
    (each expert's weight gets its own amax, as in TE's grouped GEMM)."""

    def __init__(self, fmt: GemmFormat, generator: torch.Generator | None = None):
        self.fmt, self.generator, self.stats, self.monitor = fmt, generator, QuantStats(), False

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, weight, None, fmt=self.fmt, generator=self.generator,
                                stats=self.stats if self.monitor else None)
