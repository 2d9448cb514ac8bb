"""16-point random Hadamard transform (RHT), applied to both operands of the weight-gradient GEMM only
(NVFP4 paper arXiv 2509.25149 §4.2, App. C): it spreads block outliers so fewer values flush to zero in FP4.

    x' = x H on tiles of 16 along the GEMM's reduction dim,   H = diag(s) H16 / 4,   H H^T = I
so (dY^T H)(X^T H)^T = dY^T X: the transform cancels in the product and only changes what the quantizer sees.
H16 is the Sylvester Hadamard matrix; s is a vector of random signs. Transformer Engine uses one fixed vector for
all layers and the whole run (TE_SIGNS); the paper found that as good as fresh signs per transform.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TE_SIGNS = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)     # TE nvfp4_tensor.py


def random_signs(seed: int) -> tuple[int, ...]:
    """16 random ±1 signs from a seed (an alternative to TE's fixed vector)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(int(v) for v in torch.randint(0, 2, (16,), generator=g) * 2 - 1)


def hadamard_matrix(signs=TE_SIGNS, device=None) -> torch.Tensor:
    """H = diag(signs) H16 / 4 in fp32 (entries ±1/4: exact in bf16 too)."""
    h = torch.ones(1, 1)
    for _ in range(4):                                         # Sylvester: H_2n = [[H, H], [H, -H]]
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    s = torch.tensor(signs, dtype=torch.float32)
    if s.shape != (16,) or not bool(((s == 1) | (s == -1)).all()):
        raise ValueError(f"signs must be 16 values of +1/-1, got {signs}.")
    return (s[:, None] * h / 4).to(device)


def random_hadamard_transform(x: torch.Tensor, signs=TE_SIGNS) -> torch.Tensor:
    """x H on tiles of 16 along the last dim, computed in fp32 and rounded once to x's dtype (TE computes
    bf16 @ bf16 -> bf16). The last dim is zero-padded to a multiple of 16 and the result keeps the padded length
    (cutting it back would lose part of the transform; the zero rows of the other operand match it in the GEMM)."""
    work = torch.promote_types(x.dtype, torch.float32)                 # fp32, or fp64 for fp64 input
    xp = F.pad(x.to(work), (0, -x.shape[-1] % 16))
    return (xp.unflatten(-1, (-1, 16)) @ hadamard_matrix(signs, x.device).to(work)).flatten(-2).to(x.dtype)
