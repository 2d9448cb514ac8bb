"""Independent float64 oracle for causal grouped-query attention: every query's softmax written out one query at
a time over the keys it may see, sharing no code with src/nemotron3/model/attention.py.

    out_i = sum_{j visible to i} softmax_j(q_i . k_j / sqrt(hd)) v_j,   query head h reads KV head h // (nH / nKV)
"""

import math

import torch


def attention_ref(q, k, v, visible) -> torch.Tensor:
    """q (b, nH, L, hd); k, v (b, nKV, T, hd); visible(row, i, j) -> bool says whether query i of row `row` sees key
    j. float64, one query at a time. Returns (b, nH, L, hd) float64."""
    q, k, v = q.double(), k.double(), v.double()
    b, nH, L, hd = q.shape
    nKV, T = k.shape[1], k.shape[2]
    out = torch.zeros(b, nH, L, hd, dtype=torch.float64)
    for r in range(b):
        for i in range(L):
            keys = [j for j in range(T) if visible(r, i, j)]
            for h in range(nH):
                g = h // (nH // nKV)
                scores = torch.stack([q[r, h, i] @ k[r, g, j] for j in keys]) / math.sqrt(hd)
                w = torch.softmax(scores, 0)
                out[r, h, i] = sum(w[n] * v[r, g, j] for n, j in enumerate(keys))
    return out
