"""NemotronConfig: the Nemotron-H / Nemotron 3 architecture, named presets, and config.json I/O.

Field names, meanings and defaults follow transformers' `NemotronHConfig` (models/nemotron_h), because the names
are the checkpoint contract: a config.json written here loads in transformers and NVIDIA's load here. Legacy keys
(`hybrid_override_pattern`, `mamba_n_groups`, `layer_types`, ...) are accepted on read; unknown keys (for example
real configs' unused `rope_theta`) are kept in `extra` and written back unchanged.

Differences from transformers, on purpose:
- `time_step_limit` is honoured (HF ignores it and clamps dt at `time_step_min` in prefill only); the same clamp
  is applied in prefill, decode and verify (../shared/reference/hf_nemotronh.md §4.5).
- `tie_word_embeddings=True` ties the LM head to the embedding (HF silently ignores it).
- `residual_in_fp32=True` keeps the residual stream in float32 (as NVIDIA's remote code does; HF ignores it).
- Invalid values fail here, at construction, with the field and the fix in the message.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

LAYER_TYPES = ("linear_attention", "full_attention", "moe", "mlp")
PATTERN_TO_TYPE = {"M": "linear_attention", "*": "full_attention", "E": "moe", "-": "mlp"}
TYPE_TO_PATTERN = {v: k for k, v in PATTERN_TO_TYPE.items()}
LEGACY_TYPE_NAMES = {"mamba": "linear_attention", "attention": "full_attention"}   # Nemotron 3.5-style lists
LEGACY_KEYS = {   # old config.json key -> NemotronHConfig field (transformers' __post_init__)
    "mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_expand": "expand",
    "mamba_dt_min": "time_step_min", "mamba_dt_max": "time_step_max", "mamba_dt_limit": "time_step_limit",
    "mamba_dt_init_floor": "time_step_floor", "mamba_conv_bias": "use_conv_bias", "mamba_chunk_size": "chunk_size",
    "layer_types": "layers_block_type", "num_local_experts": "n_routed_experts",
}


def pattern_to_layers(pattern: str, field_name: str = "hybrid_override_pattern") -> list[str]:
    """'M*E-' -> ['linear_attention', 'full_attention', 'moe', 'mlp']."""
    if bad := sorted(set(pattern) - set(PATTERN_TO_TYPE)):
        raise ValueError(f"{field_name}={pattern!r} has unknown letters {bad}; use only M (Mamba-2), * (attention), "
                         f"E (MoE) and - (dense MLP).")
    return [PATTERN_TO_TYPE[c] for c in pattern]


def layers_to_pattern(layers: list[str]) -> str:
    return "".join(TYPE_TO_PATTERN[t] for t in layers)


@dataclass
class NemotronConfig:
    """Nemotron-H / Nemotron 3 architecture; field names and defaults follow transformers' NemotronHConfig."""

    vocab_size: int = 131072                  # V
    hidden_size: int = 4096                   # d
    layers_block_type: list[str] = field(
        default_factory=lambda: ["linear_attention", "moe", "full_attention", "mlp"])
    """One entry per layer: linear_attention (Mamba-2, 'M'), full_attention ('*'), moe ('E'), mlp ('-')."""
    tie_word_embeddings: bool = False         # True ties lm_head to the embedding (HF ignores it)
    use_cache: bool = True
    num_logits_to_keep: int = 1
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    # attention ('*'): GQA, no positional encoding at all (the paper drops RoPE)
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    max_position_embeddings: int = 4096       # longest sequence generate() accepts; the model itself has no limit
    attention_bias: bool = False              # unused, as in HF (q/k/v/o have no bias)
    attention_dropout: float = 0.0
    sliding_window: int | None = None         # unused
    # dense MLP ('-'): down(relu(up(x))^2)
    intermediate_size: int = 21504
    mlp_hidden_act: str = "relu2"
    mlp_bias: bool = False
    use_mamba_kernels: bool = True            # unused; kept for config compatibility
    # Mamba-2 ('M'): inner width is H*P, not expand*d
    ssm_state_size: int = 128                 # N
    mamba_num_heads: int = 128                # H
    mamba_head_dim: int = 64                  # P
    mamba_hidden_act: str = "silu"
    n_groups: int = 8                         # G: B/C groups, also the gated-norm groups
    conv_kernel: int = 4                      # K of the causal depthwise conv
    expand: int = 2                           # unused (HF ignores it too)
    time_step_min: float = 0.001              # dt init range (HF also clamps prefill dt here; we do not)
    time_step_max: float = 0.1
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    """dt is clamped to this range after softplus, identically in prefill, decode and verify."""
    time_step_floor: float = 1e-4
    use_conv_bias: bool = True
    chunk_size: int = 128                     # SSD chunk length Q
    mamba_proj_bias: bool = False             # unused (in/out_proj bias comes from use_bias)
    mamba_ssm_cache_dtype: str = "float32"    # the SSM state is always float32
    # MoE ('E')
    n_routed_experts: int = 8                 # E
    output_router_logits: bool = False
    n_shared_experts: int = 1                 # always exactly one shared MLP, as in HF
    moe_intermediate_size: int = 7688         # routed expert hidden m
    moe_shared_expert_intermediate_size: int = 7688
    moe_latent_size: int | None = None        # l < d turns on LatentMoE (routed experts run in width l)
    moe_shared_expert_overlap: bool = True    # unused (a Megatron communication flag)
    num_experts_per_tok: int = 2              # K
    routed_scaling_factor: float = 1.0
    n_group: int = 1                          # group-limited routing: experts split in n_group groups ...
    topk_group: int = 1                       # ... of which the topk_group best may be chosen from
    norm_topk_prob: bool = True
    # multi-token prediction (not in HF; NVIDIA's `mtp.*` tensors)
    num_nextn_predict_layers: int = 0
    """Physical MTP blocks in the checkpoint (Super: 1); each is the `mtp_layers_block_type` layers."""
    mtp_layers_block_type: list[str] = field(default_factory=lambda: ["full_attention", "moe"])
    use_bias: bool = False                    # Mamba in_proj/out_proj bias
    initializer_range: float = 0.02
    layer_norm_epsilon: float = 1e-5
    residual_in_fp32: bool = False
    hidden_dropout: float = 0.0               # unused
    rescale_prenorm_residual: bool = True     # init: Mamba out_proj scaled by 1/sqrt(n_layers)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    """config.json keys this class does not know (e.g. rope_theta); kept and written back unchanged."""

    def __post_init__(self):
        self.layers_block_type = _normalise_layers(self.layers_block_type, "layers_block_type")
        self.mtp_layers_block_type = _normalise_layers(self.mtp_layers_block_type, "mtp_layers_block_type")
        try:
            lo, hi = (_decode_float(v) for v in self.time_step_limit)
        except (TypeError, ValueError):
            raise ValueError(f"time_step_limit={self.time_step_limit!r} must be two numbers (low, high), e.g. "
                             f"(0.0, inf).") from None
        self.time_step_limit = (lo, hi)
        self._check_types()
        self._validate()

    # ---- derived sizes ----
    @property
    def num_hidden_layers(self) -> int:
        return len(self.layers_block_type)

    @property
    def hybrid_override_pattern(self) -> str:
        return layers_to_pattern(self.layers_block_type)

    @property
    def mamba_intermediate_size(self) -> int:   # d_inner = H * P
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:            # channels of the conv: x, B and C
        return self.mamba_intermediate_size + 2 * self.n_groups * self.ssm_state_size

    @property
    def expert_input_size(self) -> int:         # width the routed experts work in: l for LatentMoE, else d
        return self.moe_latent_size or self.hidden_size

    # ---- validation: every message names the field and the fix ----
    def _check_types(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            want = {"int": int, "float": (int, float), "bool": bool, "str": str}.get(str(f.type))
            if want is None:
                continue
            if (want is int and (isinstance(v, bool) or not isinstance(v, int))) or not isinstance(v, want):
                raise ValueError(f"{f.name} must be of type {f.type}, got {v!r} ({type(v).__name__}).")

    def _validate(self):
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)

        need(self.layers_block_type, "layers_block_type is empty; give at least one layer, e.g. "
                                     "hybrid_override_pattern='M*ME'.")
        for name in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "intermediate_size", "ssm_state_size", "mamba_num_heads", "mamba_head_dim", "n_groups",
                     "chunk_size", "n_routed_experts", "moe_intermediate_size",
                     "moe_shared_expert_intermediate_size", "num_experts_per_tok", "n_group", "topk_group"):
            need(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be a positive integer.")
        need(self.conv_kernel >= 2, f"conv_kernel={self.conv_kernel} must be >= 2 (Mamba-2 uses 4).")
        need(self.num_nextn_predict_layers >= 0,
             f"num_nextn_predict_layers={self.num_nextn_predict_layers} must be >= 0 (0 = no MTP).")
        need(self.layer_norm_epsilon > 0, f"layer_norm_epsilon={self.layer_norm_epsilon} must be > 0, e.g. 1e-5.")
        need(self.mlp_hidden_act == "relu2", f"mlp_hidden_act={self.mlp_hidden_act!r} is not supported; Nemotron-H "
                                             f"uses 'relu2' (squared ReLU) for the MLP and every expert.")
        need(self.mamba_hidden_act == "silu", f"mamba_hidden_act={self.mamba_hidden_act!r} is not supported; "
                                              f"use 'silu'.")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads={self.num_attention_heads} is not a multiple of num_key_value_heads="
             f"{self.num_key_value_heads}; GQA needs a whole number of query heads per KV head.")
        need(self.mamba_num_heads % self.n_groups == 0,
             f"mamba_num_heads={self.mamba_num_heads} is not a multiple of n_groups={self.n_groups}; each B/C "
             f"group must serve a whole number of heads.")
        lo, hi = self.time_step_limit
        need(0 <= lo <= hi, f"time_step_limit={self.time_step_limit} must be (low, high) with 0 <= low <= high, "
                            f"e.g. (0.0, inf).")
        uses_moe = "moe" in self.layers_block_type or (
            self.num_nextn_predict_layers > 0 and "moe" in self.mtp_layers_block_type)
        if uses_moe:
            E, K = self.n_routed_experts, self.num_experts_per_tok
            need(K <= E, f"num_experts_per_tok={K} exceeds n_routed_experts={E}; lower the top-k or add experts.")
            need(E % self.n_group == 0, f"n_group={self.n_group} does not divide n_routed_experts={E}; choose "
                                        f"n_group among the divisors of {E}.")
            need(self.topk_group <= self.n_group, f"topk_group={self.topk_group} exceeds n_group={self.n_group}.")
            if self.n_group > 1:
                need(E // self.n_group >= 2, f"n_group={self.n_group} leaves {E // self.n_group} expert per group; "
                                             f"a group is scored by its top-2 experts, so use n_group <= {E // 2}.")
                need(K <= self.topk_group * (E // self.n_group),
                     f"num_experts_per_tok={K} exceeds the {self.topk_group * (E // self.n_group)} experts in the "
                     f"topk_group={self.topk_group} selectable groups; raise topk_group or lower the top-k.")
            if self.moe_latent_size is not None:
                need(0 < self.moe_latent_size < self.hidden_size,
                     f"moe_latent_size={self.moe_latent_size} must lie strictly between 0 and hidden_size="
                     f"{self.hidden_size}; try hidden_size // 4, or None for a standard MoE.")

    # ---- config.json I/O ----
    @classmethod
    def from_dict(cls, d: dict) -> "NemotronConfig":
        """Build from a (transformers or legacy) config dict; unknown keys land in `extra`."""
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a JSON object, got {type(d).__name__}.")
        d = dict(d)
        for old, new in LEGACY_KEYS.items():
            if old in d:
                value = d.pop(old)
                d.setdefault(new, value)
        pattern = d.pop("hybrid_override_pattern", None)
        if pattern is not None and d.get("layers_block_type") is None:
            d["layers_block_type"] = pattern_to_layers(pattern)
        mtp_pattern = d.pop("mtp_hybrid_override_pattern", None)
        if mtp_pattern is not None and d.get("mtp_layers_block_type") is None:
            d["mtp_layers_block_type"] = pattern_to_layers(mtp_pattern, "mtp_hybrid_override_pattern")
        n_layers = d.pop("num_hidden_layers", None)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        if d.get("num_key_value_heads") is None and "num_attention_heads" in d:   # HF: None means MHA
            d["num_key_value_heads"] = d["num_attention_heads"]
        known = {k: v for k, v in d.items() if k in names
                 and not (v is None and k in ("layers_block_type", "mtp_layers_block_type", "num_key_value_heads"))}
        extra = {k: v for k, v in d.items() if k not in names}
        extra.update(d.get("extra", {}) or {})
        if n_layers is not None:
            extra["num_hidden_layers"] = n_layers
        config = cls(**known, extra=extra)
        if n_layers is not None and n_layers != config.num_hidden_layers:
            raise ValueError(f"num_hidden_layers={n_layers} disagrees with the {config.num_hidden_layers} entries of "
                             f"layers_block_type/hybrid_override_pattern; fix one of them.")
        return config

    def to_dict(self) -> dict:
        """The transformers-compatible dict (model_type nemotron_h), with `extra` keys merged back."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d["time_step_limit"] = [_encode_float(v) for v in self.time_step_limit]
        d["layers_block_type"] = list(self.layers_block_type)
        d["mtp_layers_block_type"] = list(self.mtp_layers_block_type)
        out = {k: v for k, v in self.extra.items() if k not in ("num_hidden_layers",)}
        out.update(d)
        out["num_hidden_layers"] = self.num_hidden_layers
        out["model_type"] = "nemotron_h"
        out.setdefault("architectures", ["NemotronHForCausalLM"])
        return dict(sorted(out.items()))

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "NemotronConfig":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no config.json at {path}; point at a model directory saved by "
                                    f"save_pretrained or a Hugging Face NemotronH checkpoint.")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}); restore it from the original checkpoint.") from None
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def save_json(self, path: str | os.PathLike, **overrides) -> None:
        d = self.to_dict() | overrides
        with open(path, "w", encoding="utf-8") as f:
            json.dump(d, f, indent=2)
            f.write("\n")

    def replace(self, **changes) -> "NemotronConfig":
        return dataclasses.replace(self, **changes)


def _normalise_layers(layers, field_name: str) -> list[str]:
    if isinstance(layers, str):
        return pattern_to_layers(layers, field_name)
    if not isinstance(layers, (list, tuple)):
        raise ValueError(f"{field_name} must be a list of layer types or a pattern string like 'M*ME'.")
    layers = [LEGACY_TYPE_NAMES.get(t, t) for t in layers]
    if unknown := sorted(set(layers) - set(LAYER_TYPES)):
        raise ValueError(f"{field_name} has unknown entries {unknown}; use only {LAYER_TYPES} "
                         f"(pattern letters M * E -).")
    return layers


def _decode_float(v):
    if isinstance(v, dict) and "__float__" in v:       # transformers 5 writes inf as {"__float__": "Infinity"}
        return float(v["__float__"])
    return float(v)


def _encode_float(v: float):
    return {"__float__": "Infinity" if v > 0 else "-Infinity"} if math.isinf(v) else v


# ---- presets: plain dicts of overrides (gpt-fast, litgpt) ----
NANO_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
SUPER_PATTERN = ("MEMEMEM*EMEMEMEM*EMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEM*"
                 "EMEMEMEME")
_NVIDIA_COMMON = dict(vocab_size=131072, num_attention_heads=32, num_key_value_heads=2, head_dim=128,
                      mamba_head_dim=64, ssm_state_size=128, n_groups=8, conv_kernel=4, chunk_size=128,
                      max_position_embeddings=262144, n_group=1, topk_group=1, norm_topk_prob=True,
                      extra={"rope_theta": 10000, "partial_rotary_factor": 1.0})

PRESETS: dict[str, dict] = {
    # NVIDIA-Nemotron-3-Nano-30B-A3B (config.json; ../shared/reference/hf_nemotronh.md §9): 31.58B total, 3.58B active
    "nano-30b-a3b": dict(_NVIDIA_COMMON, hidden_size=2688, layers_block_type=NANO_PATTERN, mamba_num_heads=64,
                         n_routed_experts=128, num_experts_per_tok=6, moe_intermediate_size=1856,
                         moe_shared_expert_intermediate_size=3712, intermediate_size=1856,
                         routed_scaling_factor=2.5),
    # NVIDIA-Nemotron-3-Super-120B-A12B: LatentMoE l=1024, 512 experts top-22, one "*E" MTP block: 120.67B + 2.94B MTP
    "super-120b-a12b": dict(_NVIDIA_COMMON, hidden_size=4096, layers_block_type=SUPER_PATTERN, mamba_num_heads=128,
                            n_routed_experts=512, num_experts_per_tok=22, moe_intermediate_size=2688,
                            moe_shared_expert_intermediate_size=5376, moe_latent_size=1024,
                            intermediate_size=2688, routed_scaling_factor=5.0, moe_shared_expert_overlap=False,
                            num_nextn_predict_layers=1, mtp_layers_block_type="*E"),
    # CPU presets. tiny: every layer kind, LatentMoE and one MTP block, for tests and the demo (~0.3M params).
    "tiny": dict(vocab_size=256, hidden_size=64, layers_block_type="M*ME-M*E", num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, intermediate_size=96, mamba_num_heads=8, mamba_head_dim=16,
                 ssm_state_size=16, n_groups=2, chunk_size=16, n_routed_experts=8, num_experts_per_tok=2,
                 moe_intermediate_size=32, moe_shared_expert_intermediate_size=48, moe_latent_size=32,
                 routed_scaling_factor=2.5, num_nextn_predict_layers=1, mtp_layers_block_type="*E",
                 max_position_embeddings=4096),
    # small: the ~11M benchmark config of hf_nemotronh.md §11 (d=256, M*MEMEM*, 16 experts top-4).
    "small": dict(vocab_size=8192, hidden_size=256, layers_block_type="M*MEMEM*", num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, intermediate_size=1024, mamba_num_heads=8, mamba_head_dim=64,
                  ssm_state_size=64, n_groups=2, chunk_size=128, n_routed_experts=16, num_experts_per_tok=4,
                  moe_intermediate_size=256, moe_shared_expert_intermediate_size=512, max_position_embeddings=8192),
    # medium: the ~290M benchmark config (d=1024, MEMEM*EMEM*E, 32 experts top-4).
    "medium": dict(vocab_size=32000, hidden_size=1024, layers_block_type="MEMEM*EMEM*E", num_attention_heads=8,
                   num_key_value_heads=2, head_dim=128, intermediate_size=2048, mamba_num_heads=16,
                   mamba_head_dim=64, ssm_state_size=128, n_groups=2, chunk_size=128, n_routed_experts=32,
                   num_experts_per_tok=4, moe_intermediate_size=576, moe_shared_expert_intermediate_size=1152,
                   max_position_embeddings=8192),
}


def from_preset(name: str, **overrides) -> NemotronConfig:
    """A preset's config, with field overrides: from_preset("tiny", chunk_size=8)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    return NemotronConfig.from_dict(PRESETS[name] | overrides)
