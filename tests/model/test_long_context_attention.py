"""Attention paths that keep memory off L x T: a prefill chunk continuing a cache (prefix + causal chunk, merged by
log-sum-exp) and packed rows (one causal attention per packed sequence). Oracles: tests/reference/attention.py (a
float64 softmax written out query by query) and SDPA under the explicit boolean mask the model used before (the
(b, 1, L, T) mask of cached_attention_mask / the block-diagonal (L, L) mask)."""

import pytest
import torch
import torch.nn.functional as F

from nemotron3 import NemotronForCausalLM, from_preset
from nemotron3.model import attention as attention_module
from nemotron3.model.attention import cached_attention_mask, packed_causal_attention, prefix_causal_attention
from tests.hf_utils import randomize_
from tests.reference.attention import attention_ref


def qkv(b, nH, nKV, L, T, hd, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, nH, L, hd, generator=g), torch.randn(b, nKV, T, hd, generator=g),
            torch.randn(b, nKV, T, hd, generator=g))


@pytest.mark.parametrize("prefix,L,nH,nKV", [(1, 5, 4, 2), (13, 7, 4, 4), (40, 1, 6, 2), (9, 16, 8, 1)])
def test_prefix_causal_attention_equals_the_float64_reference(prefix, L, nH, nKV):
    q, k, v = qkv(2, nH, nKV, L, prefix + L, 8)
    out = prefix_causal_attention(q, k, v, prefix)
    ref = attention_ref(q, k, v, lambda r, i, j: j <= prefix + i)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_prefix_causal_attention_equals_the_boolean_mask_path_at_a_long_context():
    prefix, L = 5000, 300
    q, k, v = qkv(1, 4, 2, L, prefix + L, 16, seed=1)
    mask = cached_attention_mask(torch.tensor([prefix]), L, prefix + L, None)        # the path it replaces
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(prefix_causal_attention(q, k, v, prefix), ref, rtol=1e-5, atol=1e-5)


def spy_masks(monkeypatch):
    """Record the attn_mask of every SDPA call the attention module makes."""
    masks, sdpa = [], F.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kw):
        masks.append(attn_mask)
        return sdpa(*args, attn_mask=attn_mask, **kw)
    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", spy)
    return masks


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_(NemotronForCausalLM(from_preset("tiny", chunk_size=4)), scale=0.1).eval()


def test_chunked_prefill_builds_no_mask_and_equals_one_shot(model, monkeypatch):
    ids = torch.randint(0, model.config.vocab_size, (1, 70), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        one_shot = model(ids).logits
        masks = spy_masks(monkeypatch)
        cache = model.new_cache(1, 80)
        chunks = [model(ids[:, s:s + 16], cache=cache).logits for s in range(0, 70, 16)]
    assert masks and all(m is None for m in masks)
    torch.testing.assert_close(torch.cat(chunks, 1), one_shot, rtol=1e-4, atol=1e-4)


def test_decode_steps_over_the_cache_equal_the_one_shot_forward(model):
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        one_shot = model(ids).logits
        cache = model.new_cache(1, 40)
        model(ids[:, :33], cache=cache)
        steps = [model(ids[:, t:t + 1], cache=cache).logits for t in range(33, 40)]
    torch.testing.assert_close(torch.cat(steps, 1), one_shot[:, 33:], rtol=1e-4, atol=1e-4)


def block_diagonal_mask(seq_idx):
    """The (b, 1, L, L) block-diagonal causal mask of the dense path."""
    L = seq_idx.shape[1]
    keep = torch.ones(L, L, dtype=torch.bool).tril()[None] & (seq_idx[:, :, None] == seq_idx[:, None, :])
    return keep[:, None]


def test_packed_causal_attention_equals_the_mask_and_the_reference_with_gradients():
    lengths = [[5, 1, 10], [3, 13]]
    seq_idx = torch.stack([torch.cat([torch.full((n,), s) for s, n in enumerate(row)]) for row in lengths])
    q, k, v = qkv(2, 4, 2, 16, 16, 8, seed=3)
    ref = attention_ref(q, k, v, lambda r, i, j: j <= i and seq_idx[r, i] == seq_idx[r, j])
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = packed_causal_attention(*leaves, seq_idx)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    dense_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    dense = F.scaled_dot_product_attention(*dense_leaves, attn_mask=block_diagonal_mask(seq_idx), enable_gqa=True)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    (out * upstream).sum().backward()
    (dense * upstream).sum().backward()
    for a, b in zip(leaves, dense_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


def test_packed_model_forward_builds_no_mask(model, monkeypatch):
    position_ids = torch.cat([torch.arange(n) for n in (6, 9, 1)])[None]
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(5))
    masks = spy_masks(monkeypatch)
    with torch.no_grad():
        model(ids, position_ids=position_ids)
    assert len(masks) == 3 * 2 and all(m is None for m in masks)        # 3 sequences x 2 attention layers
