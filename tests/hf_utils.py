"""Helpers for tests that use transformers' NemotronHForCausalLM as the oracle (test-only dependency)."""

import math

import pytest
import torch


def randomize_(model, seed=0, scale=0.2):
    """Overwrite every parameter with N(0, scale) values (norm weights around 1, A_log > 0) so that outputs are far
    from zero and routing depends on e_score_correction_bias: parity at init scale (0.02) would prove little."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("norm.weight") or "layernorm" in name or name.endswith(("enorm.weight", "hnorm.weight")):
                p.copy_(1 + 0.1 * r)
            elif name.endswith("A_log"):
                p.copy_(torch.rand(p.shape, generator=g) * 1.5)
            elif name == "lm_head.weight":
                p.copy_(r * 0.5)                              # logits of order 1-10: a 1e-4 gap is then meaningful
            elif name.endswith("dt_bias"):
                p.copy_(r * 0.5 - 1)
            else:
                p.copy_(r * scale / math.sqrt(max(1, p.shape[-1] / 16)))
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
    return model


def load_in_hf(ckpt_dir):
    """transformers' model from a directory, with its prefill-only dt clamp disabled (hf_nemotronh.md §4.5): HF
    clamps dt >= time_step_min in prefill but not in decode, so its own cache disagrees with its forward; we honour
    time_step_limit = (0, inf) everywhere, which is what the clamp-free HF computes."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.NemotronHForCausalLM.from_pretrained(ckpt_dir).eval()
    for m in hf.modules():
        if hasattr(m, "time_step_limit"):
            m.time_step_limit = (0.0, float("inf"))
    return hf
