"""NVFP4: E2M1 elements, one E4M3 scale per 16-element block (or 16x16 tile), one FP32 scale per tensor.

Exact fp32 arithmetic of Transformer Engine's reference quantizer (../shared/reference/nvfp4.md §1.3), so the
values are the ones a Blackwell GPU would produce; only a GEMM's accumulation order differs when emulated:

    amax  = max|x|;  S_enc = fl(2688 / amax) (1 if amax == 0);  S_dec = fl(1 / S_enc);  M = fl(S_enc * fl(1/6))
    per block b:  s_b = e4m3_rne(min(fl(amax_b * M), 448))           # no lower clamp: subnormal scales and 0 allowed
                  e_b = min(fl(1 / fl(s_b * S_dec)), FLT_MAX)
                  q_i = e2m1(clamp(fl(x_i * e_b), -6, 6))            # round-to-nearest-even, or stochastic
    dequantize:   x̂_i = q_i * fl(fl(s_b * amax) * fl(1/2688))

2688 = 6 * 448 (E2M1 max times E4M3 max). Emulated GEMMs use q_i * s_b, which has at most 6 significant bits and so
is exact in bf16 and fp32, and apply fl(amax / 2688) of both operands after the GEMM, as TE's cuBLAS call does.
NaN or inf anywhere in x makes the whole result NaN (no NVFP4 encoding exists for them; both TE and torchao give
undefined output); a training run's divergence guard then stops. An all-zero tensor stays zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

E2M1_MAX = 6.0
E4M3_MAX = 448.0
NVFP4_RANGE = E2M1_MAX * E4M3_MAX           # 2688
FLT_MAX = torch.finfo(torch.float32).max
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)   # codes 0..7; bit 3 is the sign


def _f32(v: float, like: torch.Tensor) -> torch.Tensor:
    """A float32 constant on like's device, so every product below rounds in fp32 as the kernels do."""
    return torch.tensor(v, dtype=torch.float32, device=like.device)


def e2m1_step(a: torch.Tensor) -> torch.Tensor:
    """Spacing of the E2M1 grid around magnitude a: 0.5 below 2, 1 below 4, 2 up to 6 (arithmetic, not torch.where:
    1.7x faster on CPU)."""
    return (a >= 2).to(torch.float32).add_(1).mul_((a >= 4).to(torch.float32).add_(1)).mul_(0.5)


def round_e2m1_magnitude(a: torch.Tensor, stochastic: bool = False, generator: torch.Generator | None = None,
                         u: torch.Tensor | None = None) -> torch.Tensor:
    """Round magnitudes a in [0, 6] (fp32) to E2M1 values.
    Nearest: a/step is exact (step is a power of two) and torch.round ties to even, which is the even *code* because
    within each binade the code's parity equals that of a/step (0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4).
    Stochastic (gradients, NVFP4 paper §4.4): t = a + u*step with u ~ U[0,1), then truncate t onto the grid, so a
    rounds up with probability (a - lower)/step and E[q] = a (TE's software path, with 24 random bits, not 8).
    u: the uniform draws, if already made (the fused path draws them outside the compiled graph)."""
    if stochastic or u is not None:
        if u is None:
            u = torch.rand(a.shape, generator=generator, device=a.device, dtype=torch.float32)
        t = u * e2m1_step(a) + a
        step_t = e2m1_step(t)
        return torch.floor(t.div_(step_t)).mul_(step_t).clamp_(max=E2M1_MAX)
    step = e2m1_step(a)
    return torch.round(a / step).mul_(step)


def round_e2m1(x: torch.Tensor, stochastic: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round fp32 x to E2M1 values (round_e2m1_magnitude on |x|), saturating at ±6; the sign (and -0) is kept."""
    return torch.copysign(round_e2m1_magnitude(x.abs().clamp(max=E2M1_MAX), stochastic, generator), x)


def round_e4m3(v: torch.Tensor) -> torch.Tensor:
    """fp32 -> nearest E4M3 value (RNE, subnormals kept), saturating at 448; returned as fp32."""
    return v.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)


def _tensor_scales(amax: torch.Tensor):
    """(S_dec, M = S_enc/6) from the tensor amax (§1.3); amax == 0 gives S_enc = 1."""
    s_enc = torch.clamp(_f32(NVFP4_RANGE, amax) / amax, max=FLT_MAX)
    s_enc = torch.where((amax == 0) | (s_enc == 0), _f32(1.0, amax), s_enc)
    return _f32(1.0, amax) / s_enc, s_enc * _f32(1 / 6, amax)


def _blocks(x: torch.Tensor, tile: tuple[int, int]) -> tuple[torch.Tensor, tuple]:
    """x as fp32 blocks: (rows, C/16, 16) for 1x16, (batch, R/16, 16, C/16, 16) for 16x16 tiles over the last two dims.
    A partial last block is padded with zeros (which change no block amax and are sliced off again)."""
    x = x.float()
    C = x.shape[-1]
    pc = -C % 16
    if tile == (1, 16):
        xb = x.reshape(-1, C)
        if pc:
            xb = torch.nn.functional.pad(xb, (0, pc))
        return xb.view(xb.shape[0], -1, 16), (pc, 0)
    if tile == (16, 16):
        if x.dim() < 2:
            raise ValueError(f"tile=(16, 16) needs a matrix (or a batch of matrices), got shape {tuple(x.shape)}.")
        R = x.shape[-2]
        pr = -R % 16
        xb = x.reshape(-1, R, C)
        if pc or pr:
            xb = torch.nn.functional.pad(xb, (0, pc, 0, pr))
        return xb.view(xb.shape[0], (R + pr) // 16, 16, (C + pc) // 16, 16), (pc, pr)
    raise ValueError(f"tile={tile}: use (1, 16) for activations and gradients or (16, 16) for weights.")


def _unblock(xb: torch.Tensor, shape: torch.Size, tile: tuple[int, int], pad: tuple) -> torch.Tensor:
    pc, pr = pad
    C = shape[-1]
    if tile == (1, 16):
        out = xb.reshape(xb.shape[0], -1)
        return (out[:, :C] if pc else out).reshape(shape)
    R = shape[-2]
    out = xb.reshape(xb.shape[0], R + pr, C + pc)
    return (out[:, :R, :C] if pc or pr else out).reshape(shape)


@dataclass
class NVFP4Tensor:
    """x in NVFP4: E2M1 values q (fp32, x's shape), E4M3 block scales (fp32; (rows, C/16) for 1x16 blocks,
    (batch, R/16, C/16) for 16x16 tiles) and the fp32 tensor amax."""
    q: torch.Tensor
    block_scales: torch.Tensor
    amax: torch.Tensor
    tile: tuple[int, int]
    q_times_scale: torch.Tensor       # q * s_b, x's shape

    def _expanded_scales(self) -> torch.Tensor:
        """Each element's block scale, in x's shape."""
        s = self.block_scales
        if self.tile == (1, 16):
            s = s.repeat_interleave(16, dim=-1)[:, :self.q.shape[-1]]
        else:
            s = s.repeat_interleave(16, dim=1).repeat_interleave(16, dim=2)[:, :self.q.shape[-2], :self.q.shape[-1]]
        return s.reshape(self.q.shape)

    def gemm_operand(self) -> torch.Tensor:
        """q * s_b: at most 6 significant bits, so exact in bf16 and fp32; the GEMM multiplies by tensor_scale after."""
        return self.q_times_scale

    @property
    def tensor_scale(self) -> torch.Tensor:
        return self.amax * _f32(1 / NVFP4_RANGE, self.amax)

    def dequantize(self) -> torch.Tensor:
        """x̂ = q * fl(fl(s_b * amax) * fl(1/2688)), TE's operation order (dequantize_nvfp4.cuh); NaN everywhere if
        amax is inf or NaN."""
        factor = (self._expanded_scales() * self.amax) * _f32(1 / NVFP4_RANGE, self.amax)
        return self.q * factor + (self.amax - self.amax)


def _quantize_blocks(xb: torch.Tensor, tile_2d: bool, u: torch.Tensor | None):
    """The arithmetic of the module docstring on blocked fp32 x: (q, s_b, amax, q * s_b)."""
    ab = xb.abs()
    amax_b = ab.amax(dim=(2, 4), keepdim=True) if tile_2d else ab.amax(-1, keepdim=True)
    amax = amax_b.amax()
    s_dec, mult = _tensor_scales(amax)
    s_b = round_e4m3(amax_b * mult)
    e_b = torch.clamp(_f32(1.0, xb) / (s_b * s_dec), max=FLT_MAX)
    q = torch.copysign(round_e2m1_magnitude((ab * e_b).clamp(max=E2M1_MAX), u=u), xb)
    return q, s_b, amax, q * s_b


_fused_quantize_blocks = None


def nvfp4_quantize(x: torch.Tensor, tile: tuple[int, int] = (1, 16), stochastic: bool = False,
                   generator: torch.Generator | None = None, fused: bool = False) -> NVFP4Tensor:
    """Quantize x to NVFP4 (module docstring for the arithmetic). tile=(1, 16): blocks along the last dim;
    (16, 16): tiles over the last two dims. stochastic: unbiased stochastic rounding of the elements (gradients).
    fused: run the arithmetic as one torch.compile'd graph (same values; ~15 kernels become 2 on GPUs)."""
    global _fused_quantize_blocks
    xb, pad = _blocks(x, tile)
    u = torch.rand(xb.shape, generator=generator, device=xb.device, dtype=torch.float32) if stochastic else None
    core = _quantize_blocks
    if fused:
        if _fused_quantize_blocks is None:
            _fused_quantize_blocks = torch.compile(_quantize_blocks, dynamic=True)
        core = _fused_quantize_blocks
    q, s_b, amax, qs = core(xb, tile == (16, 16), u)
    scales = s_b.squeeze(-1) if tile == (1, 16) else s_b[:, :, 0, :, 0]
    return NVFP4Tensor(_unblock(q, x.shape, tile, pad), scales, amax, tile, _unblock(qs, x.shape, tile, pad))


def nvfp4_fake_quantize(x: torch.Tensor, tile: tuple[int, int] = (1, 16), stochastic: bool = False,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Quantize x to NVFP4 and back: same shape and dtype, values on the NVFP4 grid of x's blocks.
    tile=(1, 16): blocks of 16 along the last dimension (activations, gradients); tile=(16, 16): 16x16 tiles over
    the last two dimensions (weights, so that Q(W)^T == Q(W^T)). The tensor scale comes from x's amax.
    stochastic=True rounds the elements stochastically (unbiased) with `generator`. All-zero x stays zero; NaN or
    inf in x makes every output NaN."""
    return nvfp4_quantize(x, tile, stochastic, generator).dequantize().to(x.dtype)
