"""Independent NVFP4 / MXFP8 oracle in numpy float32 (IEEE single precision, one rounding per operation),
transcribing Transformer Engine's reference quantizer (../shared/reference/nvfp4.md §1.3, §1.7). Shares no code
with nemotron3.quant: E4M3 values come from a table built from bit patterns, E2M1 rounding from TE's threshold
list, never from torch's float8 casts."""

import numpy as np

f32 = np.float32
FLT_MAX = np.finfo(np.float32).max


def _e4m3_table():
    vals = []
    for bits in range(0x7F):                      # 0x7F is NaN in e4m3fn; 0x7E = 448 is the largest finite value
        e, m = (bits >> 3) & 0xF, bits & 7
        vals.append((m / 8) * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return np.array(vals, dtype=np.float64), np.arange(0x7F) & 7


E4M3, E4M3_MANT = _e4m3_table()


def e4m3_rne(v):
    """Nearest E4M3 value to each v >= 0 (ties to even mantissa), saturating at 448."""
    v = np.minimum(np.asarray(v, dtype=np.float64), 448.0)
    hi = np.clip(np.searchsorted(E4M3, v), 0, len(E4M3) - 1)
    lo = np.clip(hi - 1, 0, None)
    d_lo, d_hi = v - E4M3[lo], E4M3[hi] - v
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (E4M3_MANT[hi] % 2 == 0))
    return E4M3[np.where(pick_hi, hi, lo)].astype(np.float32)


def e2m1_rne(x):
    """TE's thresholds: [0,.25]->0 (.25,.75)->.5 [.75,1.25]->1 (1.25,1.75)->1.5 [1.75,2.5]->2 (2.5,3.5)->3 [3.5,5]->4 >5->6."""
    a = np.abs(x)
    q = np.select([a <= 0.25, a < 0.75, a <= 1.25, a < 1.75, a <= 2.5, a < 3.5, a <= 5.0],
                  [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0], 6.0)
    return (np.sign(x) * q).astype(np.float32)


@np.errstate(over="ignore", divide="ignore")          # 1/tiny -> inf is clamped to FLT_MAX, as in TE
def nvfp4_reference(x, tile=(1, 16)):
    """Dequantized NVFP4 of a 2-D float32 array x (dims multiples of 16), plus the block scales, per TE §1.3."""
    x = np.asarray(x, dtype=np.float32)
    R, C = x.shape
    amax = f32(np.max(np.abs(x)))
    s_enc = f32(min(f32(f32(2688.0) / amax) if amax > 0 else np.inf, FLT_MAX))
    if amax == 0 or s_enc == 0:
        s_enc = f32(1.0)
    s_dec = f32(f32(1.0) / s_enc)
    mult = f32(s_enc * f32(1.0 / 6.0))
    out = np.empty_like(x)
    th, tw = tile
    scales = np.empty((R // th, C // tw), dtype=np.float32)
    for i in range(0, R, th):
        for j in range(0, C, tw):
            blk = x[i:i + th, j:j + tw]
            s_b = e4m3_rne(min(f32(f32(np.max(np.abs(blk))) * mult), f32(448.0)))
            denom = f32(s_b * s_dec)
            e_b = f32(min(f32(f32(1.0) / denom) if denom > 0 else np.inf, FLT_MAX))
            q = e2m1_rne(np.clip((blk * e_b).astype(np.float32), -6, 6))
            out[i:i + th, j:j + tw] = q * f32(f32(s_b * amax) * f32(1.0 / 2688.0))
            scales[i // th, j // tw] = s_b
    return out, scales


def mxfp8_reference(x, block=32):
    """Dequantized MXFP8 (E4M3 elements, power-of-two scale rounded up from amax/448) of a 2-D float32 array."""
    x = np.asarray(x, dtype=np.float32)
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        for j in range(0, x.shape[1], block):
            blk = x[i, j:j + block]
            v = f32(f32(np.max(np.abs(blk))) * f32(1.0 / 448.0))
            e = -127 if v == 0 else int(np.ceil(np.log2(np.float64(v))))
            scale = 2.0 ** max(-127, min(127, e))
            data = np.sign(blk) * e4m3_rne(np.abs(blk.astype(np.float64) / scale))
            out[i, j:j + block] = (data * scale).astype(np.float32)
    return out
