"""NemotronConfig. Oracles: NVIDIA's published parameter counts (hf_nemotronh.md §9: Nano 31.58B / 3.58B active,
Super 120.67B + 2.94B MTP, 12.77B active) and transformers' NemotronHConfig for config.json in both directions."""

import json
import math

import pytest

from nemotron3 import NemotronConfig, count_parameters, from_preset
from nemotron3.config import PRESETS


def test_nano_parameter_counts_match_nvidia():
    n = count_parameters(from_preset("nano-30b-a3b"))
    assert n["total"] == 31_577_937_344 and n["active"] == 3_580_073_408
    assert n["active"] - 131072 * 2688 == 3_227_751_872          # NVIDIA's "3.2B active" excludes the embedding
    assert n["mtp_total"] == 0


def test_super_parameter_counts_match_nvidia():
    n = count_parameters(from_preset("super-120b-a12b"))
    assert n["total"] == 120_668_687_360 and n["active"] == 12_770_216_960
    assert n["mtp_total"] == 2_942_324_736


def test_small_benchmark_preset_is_the_11m_reference_config():
    assert count_parameters(from_preset("small"))["total"] == 11_177_312     # hf_nemotronh.md §11: 11.18M


def test_presets_have_the_published_layer_plans():
    nano, sup = from_preset("nano-30b-a3b"), from_preset("super-120b-a12b")
    assert nano.num_hidden_layers == 52 and sup.num_hidden_layers == 88
    assert [nano.layers_block_type.count(k) for k in ("linear_attention", "moe", "full_attention")] == [23, 23, 6]
    assert [sup.layers_block_type.count(k) for k in ("linear_attention", "moe", "full_attention")] == [40, 40, 8]
    assert sup.moe_latent_size == 1024 and nano.moe_latent_size is None
    assert sup.mtp_layers_block_type == ["full_attention", "moe"]


def test_legacy_keys_and_pattern_are_accepted():
    c = NemotronConfig.from_dict({"hybrid_override_pattern": "M*E-", "mamba_n_groups": 2, "mamba_d_conv": 3,
                                  "mamba_chunk_size": 64, "mtp_hybrid_override_pattern": "*E", "rope_theta": 1e4,
                                  "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": None,
                                  "hidden_size": 64, "mamba_num_heads": 4, "head_dim": 16})
    assert c.layers_block_type == ["linear_attention", "full_attention", "moe", "mlp"]
    assert (c.n_groups, c.conv_kernel, c.chunk_size, c.num_key_value_heads) == (2, 3, 64, 4)
    assert c.extra["rope_theta"] == 1e4 and c.to_dict()["rope_theta"] == 1e4
    assert NemotronConfig(layers_block_type=["mamba", "attention", "moe"]).hybrid_override_pattern == "M*E"


def test_config_json_round_trips_through_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = from_preset("super-120b-a12b")
    ours.save_json(tmp_path / "config.json")
    theirs = transformers.NemotronHConfig.from_pretrained(tmp_path)
    assert theirs.hybrid_override_pattern == ours.hybrid_override_pattern
    assert theirs.moe_latent_size == 1024 and theirs.num_nextn_predict_layers == 1
    assert theirs.mtp_layers_block_type == ["full_attention", "moe"]
    assert list(theirs.time_step_limit) == [0.0, math.inf]
    theirs.save_pretrained(tmp_path / "hf")
    back = NemotronConfig.from_json_file(tmp_path / "hf")
    for f in ("hidden_size", "layers_block_type", "n_routed_experts", "num_experts_per_tok", "moe_latent_size",
              "routed_scaling_factor", "time_step_limit", "mamba_num_heads", "num_key_value_heads"):
        assert getattr(back, f) == getattr(ours, f), f


def test_time_step_limit_infinity_is_written_the_transformers_way(tmp_path):
    from_preset("tiny").save_json(tmp_path / "c.json")
    d = json.loads((tmp_path / "c.json").read_text())
    assert d["time_step_limit"] == [0.0, {"__float__": "Infinity"}] and d["model_type"] == "nemotron_h"


@pytest.mark.parametrize("overrides,match", [
    (dict(layers_block_type="M*X"), r"unknown letters \['X'\]"),
    (dict(layers_block_type=["mamba2"]), "unknown entries"),
    (dict(num_attention_heads=6, num_key_value_heads=4), "num_key_value_heads"),
    (dict(mamba_num_heads=6, n_groups=4), "n_groups"),
    (dict(num_experts_per_tok=9), "exceeds n_routed_experts"),
    (dict(n_group=3), "n_group=3 does not divide"),
    (dict(n_group=4, topk_group=1, num_experts_per_tok=3), "topk_group"),
    (dict(moe_latent_size=64), "strictly between 0 and hidden_size"),
    (dict(hidden_size=0), "hidden_size=0 must be a positive"),
    (dict(time_step_limit=(0.5, 0.1)), "time_step_limit"),
    (dict(time_step_limit=0.1), "must be two numbers"),
    (dict(mlp_hidden_act="gelu"), "relu2"),
    (dict(hidden_size="64"), "hidden_size must be of type int"),
    (dict(num_hidden_layers=3), "disagrees"),
    (dict(layers_block_type=[]), "empty"),
])
def test_invalid_config_names_field_and_fix(overrides, match):
    with pytest.raises(ValueError, match=match):
        NemotronConfig.from_dict(PRESETS["tiny"] | overrides)


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="choose one of"):
        from_preset("nano")


def test_bad_config_json_is_reported_with_its_path(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        NemotronConfig.from_json_file(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        NemotronConfig.from_json_file(tmp_path / "missing")
