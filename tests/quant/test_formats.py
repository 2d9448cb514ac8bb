"""NVFP4 / MXFP8 / Hadamard formats against independent references: a numpy float32 transcription of
Transformer Engine's quantizer (tests/reference/nvfp4.py, bit-exact) and torchao 0.18 (bit-exact where the two
libraries compute the same fp32 scale factors; the known 1-ulp and clamp differences are asserted, not hidden)."""

import warnings

import pytest
import torch

from nemotron3.quant import (TE_SIGNS, hadamard_matrix, mxfp8_fake_quantize, nvfp4_fake_quantize, nvfp4_quantize,
                             random_hadamard_transform, round_e2m1)
from tests.reference.nvfp4 import e2m1_rne, mxfp8_reference, nvfp4_reference

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torchao.prototype.mx_formats import kernels as ao_kernels
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.mx_tensor import to_dtype, to_mx
    from torchao.prototype.mx_formats.nvfp4_tensor import nvfp4_quantize as ao_nvfp4_quantize
    from torchao.prototype.mx_formats.nvfp4_tensor import per_tensor_amax_to_scale


def _cases():
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(64, 128, generator=g)
    torch.manual_seed(0)
    heavy = torch.distributions.StudentT(1.5).sample((64, 128))
    outlier = torch.randn(64, 128, generator=g)
    outlier[3, 7] = 1e6                                  # most blocks get subnormal or zero E4M3 scales
    zero_block = torch.randn(64, 128, generator=g)
    zero_block[5, 16:32] = 0
    zero_block[8, 32:48] = -0.0
    sub = torch.randn(64, 128, generator=g) * 1e-39      # fp32 subnormal inputs
    # E2M1 midpoints: blocks of amax 6 whose scaled values sit on (or one ulp beside) rounding ties
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 2).repeat(64, 8)
    mids = mids * torch.tensor([1.0, -1.0]).repeat(32)[:, None]
    return {"normal": normal, "student_t": heavy, "outlier": outlier, "zero_block": zero_block,
            "subnormal": sub, "midpoints": mids, "bf16_normal": torch.randn(64, 128, generator=g).bfloat16().float()}


@pytest.mark.parametrize("name", list(_cases()))
@pytest.mark.parametrize("tile", [(1, 16), (16, 16)])
def test_nvfp4_bit_exact_with_te_reference(name, tile):
    x = _cases()[name]
    ref, ref_scales = nvfp4_reference(x.numpy(), tile)
    ours = nvfp4_fake_quantize(x, tile)
    assert torch.equal(ours, torch.from_numpy(ref)), (ours - torch.from_numpy(ref)).abs().max()
    scales = nvfp4_quantize(x, tile).block_scales.reshape(ref_scales.shape)
    assert torch.equal(scales, torch.from_numpy(ref_scales))


def test_e2m1_rounding_at_every_midpoint_and_its_neighbours():
    grid = torch.tensor([0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 100])
    x = torch.cat([grid, torch.nextafter(grid, torch.tensor(-1.0)), torch.nextafter(grid, torch.tensor(10.0))])
    x = torch.cat([x, -x]).clamp(-6, 6)
    ours = round_e2m1(x)
    assert torch.equal(ours, torch.from_numpy(e2m1_rne(x.numpy())))
    ao = ao_kernels.f4_unpacked_to_f32(ao_kernels.f32_to_f4_unpacked(x))      # torchao's cast, same values
    assert torch.equal(ours, ao)


def _torchao_nvfp4(x):
    """torchao's two-level NVFP4 (per-tensor scale amax/2688), dequantized, and its block scales and the fp32
    multiplier it applies to x (to locate where it differs from TE's operation order)."""
    pts = per_tensor_amax_to_scale(x.abs().amax())
    scales, packed = ao_nvfp4_quantize(x, 16, pts)
    vals = ao_kernels.f4_unpacked_to_f32(ao_kernels.unpack_uint4(packed)).view(x.shape[0], -1, 16)
    s = scales.float().view(x.shape[0], -1, 1)
    mult = (1.0 / pts) / s
    return (vals * (pts * s)).view_as(x), vals.view_as(x), s.squeeze(-1), mult


@pytest.mark.parametrize("name", ["normal", "bf16_normal", "student_t", "midpoints", "zero_block"])
def test_nvfp4_matches_torchao_where_the_scale_factors_agree(name):
    x = _cases()[name]
    _, ao_vals, ao_scales, ao_mult = _torchao_nvfp4(x)
    q = nvfp4_quantize(x)
    # block scales: identical wherever TE's scale is not below torchao's 2^-6 clamp and both compute the same fp32
    # value before the E4M3 rounding (TE: amax_b * fl(S_enc/6); torchao: (amax_b/6) / (amax/2688), 1 ulp apart
    # now and then, which matters only at E4M3 ties)
    amax_b = x.abs().view(x.shape[0], -1, 16).amax(-1)
    s_enc = torch.tensor(2688.0) / x.abs().amax()
    pre_te = amax_b * (s_enc * torch.tensor(1 / 6))
    pre_ao = (amax_b / 6) / per_tensor_amax_to_scale(x.abs().amax())
    normal_scale = q.block_scales >= 2 ** -6
    assert torch.equal(q.block_scales[normal_scale & (pre_te == pre_ao)], ao_scales[normal_scale & (pre_te == pre_ao)])
    assert (q.block_scales != ao_scales)[normal_scale].float().mean() < 5e-3
    # codes: identical in every block whose fp32 encode multiplier is bitwise the same in both libraries
    te_mult = 1.0 / (q.block_scales * (1.0 / s_enc))
    same = (te_mult == ao_mult.squeeze(-1)) & (q.block_scales == ao_scales) & normal_scale
    if name != "midpoints":      # there every block has the same amax and the multipliers differ by 1 ulp
        assert same.sum() > 0.5 * normal_scale.sum()
    qb, ab = q.q.view(x.shape[0], -1, 16), ao_vals.view(x.shape[0], -1, 16)
    assert torch.equal(qb[same], ab[same])
    # elsewhere the multipliers differ by ~1 ulp, so only values at E2M1 rounding ties may differ
    diff = (qb != ab) & ~same[..., None]
    if name != "midpoints":
        assert diff.float().mean() < 5e-3


def test_edge_cases_zero_nan_inf():
    z = torch.zeros(4, 32)
    assert torch.equal(nvfp4_fake_quantize(z), z) and torch.equal(nvfp4_fake_quantize(z, (16, 16)), z[:, :32])
    ao_zero, *_ = _torchao_nvfp4(z)
    assert ao_zero.isnan().all()            # torchao's known all-zero bug (nvfp4.md §5); ours stays zero
    neg = torch.full((1, 16), -0.0)
    assert torch.equal(nvfp4_fake_quantize(neg), neg)
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.randn(4, 32)
        x[1, 3] = bad
        assert nvfp4_fake_quantize(x).isnan().all(), bad
        assert mxfp8_fake_quantize(x)[1, :32].isnan().all() and mxfp8_fake_quantize(x)[0].isfinite().all()


def test_shapes_dtypes_and_padding():
    x = torch.randn(3, 5, 40, dtype=torch.bfloat16)           # 40 is not a multiple of 16: zero-padded blocks
    y = nvfp4_fake_quantize(x)
    assert y.shape == x.shape and y.dtype == torch.bfloat16
    padded = torch.nn.functional.pad(x.float().reshape(15, 40), (0, 8))
    ref, _ = nvfp4_reference(padded.numpy())
    assert torch.equal(y.float().reshape(15, 40), torch.from_numpy(ref[:, :40]).bfloat16().float())
    with pytest.raises(ValueError, match="tile"):
        nvfp4_fake_quantize(x, tile=(4, 4))


def test_2d_tiles_commute_with_transpose():
    w = torch.randn(48, 80)
    assert torch.equal(nvfp4_fake_quantize(w, (16, 16)).t(), nvfp4_fake_quantize(w.t().contiguous(), (16, 16)))
    assert not torch.equal(nvfp4_fake_quantize(w).t(), nvfp4_fake_quantize(w.t().contiguous()))


def test_stochastic_rounding_is_unbiased_seeded_and_on_grid():
    x = torch.randn(8, 64)
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([nvfp4_fake_quantize(x, stochastic=True, generator=g) for _ in range(2000)])
    rne = nvfp4_fake_quantize(x)
    assert (draws != 0).any(dim=0).float().mean() > 0.95            # TE #3281: SR must not zero everything
    bias = (draws.mean(0) - x).abs().mean()
    assert bias < 0.1 * (rne - x).abs().mean()                     # E[SR(x)] = x; RNE is biased per element
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6]).repeat(1000)       # E2M1 values never move under SR
    assert torch.equal(round_e2m1(grid, stochastic=True, generator=g), grid)
    assert torch.equal(round_e2m1(-grid, stochastic=True, generator=g), -grid)
    between = torch.full((20000,), 2.25)                                 # 2.25 -> 2 or 3, mean 2.25, never else
    r = round_e2m1(between, stochastic=True, generator=g)
    assert set(r.unique().tolist()) == {2.0, 3.0} and abs(r.mean().item() - 2.25) < 0.02
    a = nvfp4_fake_quantize(x, stochastic=True, generator=torch.Generator().manual_seed(5))
    b = nvfp4_fake_quantize(x, stochastic=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["normal", "student_t", "outlier", "zero_block", "bf16_normal"])
def test_mxfp8_bit_exact_with_te_reference_and_torchao_rceil(name):
    x = _cases()[name]
    ours = mxfp8_fake_quantize(x)
    assert torch.equal(ours, torch.from_numpy(mxfp8_reference(x.numpy())))
    scale, data = to_mx(x, torch.float8_e4m3fn, 32, ScaleCalculationMode.RCEIL)
    ao = to_dtype(data, scale, torch.float8_e4m3fn, 32, torch.float32)
    assert torch.equal(ours, ao)


def test_hadamard_matrix_and_transform():
    H = hadamard_matrix()
    i = torch.arange(16)
    popcount = torch.tensor([bin(v).count("1") for v in (i[:, None] & i[None, :]).flatten().tolist()]).view(16, 16)
    expected = torch.tensor(TE_SIGNS, dtype=torch.float32)[:, None] * (-1.0) ** popcount / 4
    assert torch.equal(H, expected)
    assert torch.allclose(H @ H.t(), torch.eye(16), atol=1e-7)
    a, b = torch.randn(8, 40, dtype=torch.float64), torch.randn(6, 40, dtype=torch.float64)
    ta, tb = random_hadamard_transform(a), random_hadamard_transform(b)
    assert ta.shape == (8, 48)                                      # padded to a multiple of 16
    assert torch.allclose(ta @ tb.t(), a @ b.t(), atol=1e-10)       # the transform cancels in the GEMM
    xb = torch.randn(4, 32, dtype=torch.bfloat16)
    assert random_hadamard_transform(xb).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="signs"):
        hadamard_matrix((1, 2))


def test_fused_quantizer_is_bit_identical():
    x = torch.randn(48, 64) * torch.rand(48, 1) * 5
    for tile in ((1, 16), (16, 16)):
        assert torch.equal(nvfp4_quantize(x, tile, fused=True).dequantize(), nvfp4_quantize(x, tile).dequantize())
