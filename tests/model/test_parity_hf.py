"""Full-model parity. Oracle: transformers' NemotronHForCausalLM (test-only dependency) on the same weights, loaded
both directions through the checkpoint format, with HF's prefill-only dt clamp disabled (see hf_utils.load_in_hf)."""

import pytest
import torch

from nemotron3 import NemotronForCausalLM, from_preset
from tests.hf_utils import load_in_hf, randomize_

transformers = pytest.importorskip("transformers")

CONFIGS = {
    # every layer kind, LatentMoE, MTP weights present (HF ignores them), L=37 across chunk_size=16
    "latent": dict(),
    # standard MoE with grouped routing, MHA-free GQA 4:1, biases on the Mamba projections, no D-sized chunking
    "grouped": dict(layers_block_type="ME*-EM", moe_latent_size=None, n_group=4, topk_group=2,
                    num_experts_per_tok=3, num_attention_heads=8, num_key_value_heads=2, head_dim=8, use_bias=True,
                    chunk_size=8, norm_topk_prob=False, routed_scaling_factor=1.0, num_nextn_predict_layers=0),
    # Mamba without conv bias, MHA, single group, top-1
    "mha": dict(layers_block_type="M*EM", use_conv_bias=False, num_key_value_heads=4, n_groups=1,
                num_experts_per_tok=1, chunk_size=5, moe_latent_size=16, num_nextn_predict_layers=0),
}


def ours_and_hf(tmp_path, name, seed=0):
    torch.manual_seed(seed)
    ours = randomize_(NemotronForCausalLM(from_preset("tiny", **CONFIGS[name])), seed).eval()
    ours.save_pretrained(tmp_path / name)
    return ours, load_in_hf(tmp_path / name)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("seq_len", [1, 13, 37])
def test_logits_match_hf(tmp_path, name, seq_len):
    ours, hf = ours_and_hf(tmp_path, name)
    ids = torch.randint(0, 256, (2, seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(ids).logits, hf(ids).logits
    assert a.dtype == torch.float32 and a.abs().max() > 1             # a strong signal, not near-zero logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def left_padded_batch():
    ids = torch.randint(1, 256, (3, 21), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 21, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, :17] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("name", ["latent", "mha"])
def test_left_padded_batch_matches_hf(tmp_path, name):
    ours, hf = ours_and_hf(tmp_path, name)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["latent", "grouped"])
def test_left_padded_rows_equal_rows_alone(tmp_path, name):
    """Batched == one by one. With use_bias=True ("grouped") this is where we differ from HF on purpose: HF lets
    in_proj's bias at padded positions leak into the conv window of the first real tokens; we zero padded conv
    inputs. (NVIDIA's configs all have use_bias=False, where both agree: the test above.)"""
    torch.manual_seed(0)
    ours = randomize_(NemotronForCausalLM(from_preset("tiny", **CONFIGS[name]))).eval()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        batched = ours(ids, attention_mask=mask).logits
        for row, start in [(0, 0), (1, 5), (2, 17)]:
            alone = ours(ids[row:row + 1, start:]).logits[0]
            torch.testing.assert_close(batched[row, start:], alone, rtol=0, atol=1e-4)


def test_hf_checkpoint_loads_in_ours(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.NemotronHConfig(
        vocab_size=99, hidden_size=32, hybrid_override_pattern="M*E-ME", num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_size=40, mamba_num_heads=4, mamba_head_dim=8,
        ssm_state_size=8, n_groups=2, chunk_size=4, n_routed_experts=6, num_experts_per_tok=2,
        moe_intermediate_size=16, moe_shared_expert_intermediate_size=24, moe_latent_size=12)
    hf = randomize_(transformers.NemotronHForCausalLM(cfg), seed=3).eval()
    hf.save_pretrained(tmp_path / "hf")
    hf = load_in_hf(tmp_path / "hf")
    ours = NemotronForCausalLM.from_pretrained(tmp_path / "hf")
    assert ours.config.hybrid_override_pattern == "M*E-ME" and ours.config.moe_latent_size == 12
    ids = torch.randint(0, 99, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=0, atol=1e-4)


def test_greedy_generate_matches_hf(tmp_path):
    ours, hf = ours_and_hf(tmp_path, "latent")
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    a = ours.generate(ids, max_new_tokens=12)
    b = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(a, b)


def test_decode_with_cache_matches_hf_full_forward(tmp_path):
    ours, hf = ours_and_hf(tmp_path, "grouped")
    ids = torch.randint(0, 256, (2, 14), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = hf(ids).logits
        cache = ours.new_cache(2, 14)
        steps = [ours(ids[:, :5], cache=cache).logits] + [ours(ids[:, t:t + 1], cache=cache).logits
                                                          for t in range(5, 14)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-4)
