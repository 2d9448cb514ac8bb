"""The quantized linear layer's three GEMMs against the recipe written out with the fake quantizer and float64
GEMMs (nvfp4.md §2.1): fprop Q(X) Q(W)^T, dgrad Q(dY) Q(W), wgrad Q(dY^T H) Q(X^T H)^T."""

import pytest
import torch

from nemotron3.quant import (GemmFormat, QuantStats, mxfp8_fake_quantize, nvfp4_fake_quantize,
                             random_hadamard_transform, quantized_linear)

NO_SR = GemmFormat(stochastic_rounding=False)


def _run(fmt, x, w, b=None, dy=None, seed=0):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    b = b.clone().requires_grad_() if b is not None else None
    y = quantized_linear(x, w, b, fmt=fmt, generator=torch.Generator().manual_seed(seed))
    y.backward(dy)
    return y.detach(), x.grad, w.grad, (b.grad if b is not None else None)


def _close(a, ref):
    assert torch.allclose(a.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item()), (a.double() - ref).abs().max()


@pytest.mark.parametrize("shape", [(4, 8, 48), (37, 40)])      # M = 32 / 37 tokens, K = 48 / 40 (padding)
def test_three_gemms_follow_the_recipe(shape):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    w, b = torch.randn(24, shape[-1]) * 0.1, torch.randn(24)
    dy = torch.randn(*shape[:-1], 24)
    y, dx, dw, db = _run(NO_SR, x, w, b, dy)
    x2, dy2 = x.reshape(-1, shape[-1]), dy.reshape(-1, 24)
    qw = nvfp4_fake_quantize(w, (16, 16)).double()
    _close(y.reshape(-1, 24), nvfp4_fake_quantize(x2).double() @ qw.t() + b.double())
    _close(dx.reshape(x2.shape), nvfp4_fake_quantize(dy2).double() @ qw)
    hd, hx = random_hadamard_transform(dy2.t().contiguous()), random_hadamard_transform(x2.t().contiguous())
    _close(dw, nvfp4_fake_quantize(hd).double() @ nvfp4_fake_quantize(hx).double().t())
    _close(db, dy2.double().sum(0))


def test_ablation_switches():
    torch.manual_seed(1)
    x, w, dy = torch.randn(32, 32), torch.randn(16, 32), torch.randn(32, 16)
    _, dx, dw, _ = _run(GemmFormat(rht=False, stochastic_rounding=False, weight_tile_2d=False), x, w, None, dy)
    _close(dx, nvfp4_fake_quantize(dy).double() @ nvfp4_fake_quantize(w.t().contiguous()).double().t())
    _close(dw, nvfp4_fake_quantize(dy.t().contiguous()).double() @ nvfp4_fake_quantize(x.t().contiguous()).double().t())
    y, dx, dw, _ = _run(GemmFormat("mxfp8"), x, w, None, dy)
    _close(y, mxfp8_fake_quantize(x).double() @ mxfp8_fake_quantize(w).double().t())
    _close(dx, mxfp8_fake_quantize(dy).double() @ mxfp8_fake_quantize(w.t().contiguous()).double().t())
    _close(dw, mxfp8_fake_quantize(dy.t().contiguous()).double() @ mxfp8_fake_quantize(x.t().contiguous()).double().t())


def test_stochastic_rounding_makes_gradients_unbiased():
    torch.manual_seed(2)
    x, w, dy = torch.randn(64, 32), torch.randn(16, 32), torch.randn(64, 16)
    qw = nvfp4_fake_quantize(w, (16, 16)).double()
    target = dy.double() @ qw                           # E[dX] with SR = dY Q(W) exactly
    draws = torch.stack([_run(GemmFormat(), x, w, None, dy, seed=s)[1] for s in range(300)]).double()
    one = (draws[0] - target).norm()
    assert (draws.mean(0) - target).norm() < 0.15 * one
    _, dx_rne, _, _ = _run(NO_SR, x, w, None, dy)
    assert (dx_rne.double() - target).norm() > 3 * (draws.mean(0) - target).norm()
    a, b = _run(GemmFormat(), x, w, None, dy, seed=7), _run(GemmFormat(), x, w, None, dy, seed=7)
    assert all(torch.equal(u, v) for u, v in zip(a[:3], b[:3]))          # seeded: reproducible


def test_gradients_track_high_precision_and_stats():
    torch.manual_seed(3)
    x, w, dy = torch.randn(128, 64), torch.randn(32, 64) * 0.05, torch.randn(128, 32)
    stats = QuantStats()
    xq, wq = x.clone().requires_grad_(), w.clone().requires_grad_()
    quantized_linear(xq, wq, fmt=GemmFormat(), generator=torch.Generator().manual_seed(0), stats=stats).backward(dy)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    torch.nn.functional.linear(xr, wr).backward(dy)
    cos = torch.nn.functional.cosine_similarity
    assert cos(xq.grad.flatten(), xr.grad.flatten(), 0) > 0.97 and cos(wq.grad.flatten(), wr.grad.flatten(), 0) > 0.97
    s = stats.summary()
    assert set(s) == {"ftz_act", "err_act", "ftz_weight", "err_weight", "ftz_grad", "err_grad", "wgrad_zero"}
    assert 0.03 < s["ftz_act"] < 0.12 and 0.05 < s["ftz_weight"] < 0.15     # N(0,1): 6.8% (1x16), 10.1% (16x16)
    assert 0.05 < s["err_act"] < 0.2 and stats.summary() == {}


def test_autocast_and_dtypes():
    x, w = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True), torch.randn(16, 32, requires_grad=True)
    y = quantized_linear(x, w)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert quantized_linear(torch.randn(4, 32), w).dtype == torch.bfloat16
