"""Which layers train in NVFP4, MXFP8 or high precision, and how a model is converted (from outside the model).

Nemotron 3 Super/Ultra recipe (white paper §2.4, Super report Tab. 3; nvfp4.md §2.2), our defaults:
    NVFP4  every linear layer not listed below: Mamba in_proj, routed experts (LatentMoE too), shared experts, MLPs
    high   the last 15% of the hybrid layers (Super: the last 14 of 88), LatentMoE latent projections (d->l, l->d),
           MTP layers, attention Q/K/V/O projections; and always embeddings, LM head, router, norms, conv, SSM scan
    MXFP8  Mamba out_proj (NVFP4 flushed up to 40% of its values to zero on Nano)
"high" is the run's high precision: fp32, or bf16 under autocast on GPUs. Master weights, gradients and optimizer
state stay fp32. Within NVFP4 layers: 16x16 weight tiles, RHT on wgrad, stochastic rounding of gradients.

    quant = apply_recipe(model, NVFP4Recipe())     # swaps nn.Linear -> QuantLinear; parameters are shared
    print(explain(quant.plan))
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .hadamard import TE_SIGNS
from .linear import GemmFormat, QuantExpertLinear, QuantLinear

FORMATS = ("nvfp4", "mxfp8", "high")


@dataclass
class NVFP4Recipe:
    high_precision_last: float = 0.15
    """Share of the hybrid layers, counted from the end, kept in high precision (rounded up)."""
    mamba_out_proj: str = "mxfp8"
    """Format of Mamba out_proj: mxfp8 (paper), nvfp4 or high."""
    attention: str = "high"
    """Format of the attention Q/K/V/O projections."""
    latent_projections: str = "high"
    """Format of LatentMoE's fc1_latent_proj / fc2_latent_proj."""
    mtp: str = "high"
    """Format of every linear layer in the MTP heads."""
    rht: bool = True
    """Random Hadamard transform on both weight-gradient operands."""
    stochastic_rounding: bool = True
    """Stochastic rounding of gradients (dgrad and wgrad)."""
    weight_tile_2d: bool = True
    """16x16 weight tiles (else 1x16 blocks, W and W^T quantized separately)."""
    all_nvfp4: bool = False
    """Ablation: every linear layer of the hybrid stack and the MTP heads in NVFP4 (embeddings, LM head and
    router stay high: they are not GEMMs of a block)."""
    fused: str = "auto"
    """Quantize with torch.compile'd kernels: auto (on CUDA), on, off. Same values; the emulation's speed on GPUs."""
    seed: int = 0
    """Seed of the stochastic-rounding generator (reseeded per step by the trainer for exact resume)."""
    signs: tuple = field(default=TE_SIGNS)
    """Hadamard sign vector (TE's fixed one by default)."""

    def __post_init__(self):
        for name in ("mamba_out_proj", "attention", "latent_projections", "mtp"):
            if getattr(self, name) not in FORMATS:
                raise ValueError(f"NVFP4Recipe.{name}={getattr(self, name)!r}: use one of {', '.join(FORMATS)}.")
        if self.fused not in ("auto", "on", "off"):
            raise ValueError(f"NVFP4Recipe.fused={self.fused!r}: use auto, on or off.")
        if not 0 <= self.high_precision_last <= 1:
            raise ValueError(f"high_precision_last={self.high_precision_last}: use a share in [0, 1] (paper: 0.15).")


@dataclass
class LayerPlan:
    name: str          # module name in the model
    kind: str          # mamba_in, mamba_out, attention, experts, shared_expert, mlp, latent_proj, mtp, lm_head
    format: str        # nvfp4 | mxfp8 | high
    reason: str


_KIND_OF_LEAF = [(r"mixer\.in_proj$", "mamba_in"), (r"mixer\.out_proj$", "mamba_out"),
                 (r"mixer\.[qkvo]_proj$", "attention"), (r"experts$", "experts"),
                 (r"shared_experts\.(up|down)_proj$", "shared_expert"), (r"latent_proj$", "latent_proj"),
                 (r"mixer\.(up|down)_proj$", "mlp"), (r"eh_proj$", "mtp"), (r"^lm_head$", "lm_head")]


def plan(model: nn.Module, recipe: NVFP4Recipe) -> list[LayerPlan]:
    """The format of every linear layer (and routed-experts module) of a NemotronForCausalLM under `recipe`."""
    n = len(model.backbone.layers)
    first_high = n - math.ceil(round(recipe.high_precision_last * n, 6))
    out = []
    for name, mod in model.named_modules():
        if not (isinstance(mod, nn.Linear) or hasattr(mod, "up_proj") and hasattr(mod, "linear")):
            continue
        kind = next((k for pat, k in _KIND_OF_LEAF if re.search(pat, name)), "other")
        layer = re.match(r"backbone\.layers\.(\d+)\.", name)
        if kind == "lm_head":
            fmt, why = "high", "output head (always)"
        elif name.startswith("mtp."):
            fmt, why = ("nvfp4", "all_nvfp4 ablation") if recipe.all_nvfp4 else (recipe.mtp, "MTP layers")
            kind = kind if kind != "other" else "mtp"
        elif recipe.all_nvfp4:
            fmt, why = "nvfp4", "all_nvfp4 ablation"
        elif layer and int(layer.group(1)) >= first_high:
            fmt, why = "high", f"last {n - first_high} of {n} layers"
        elif kind == "mamba_out":
            fmt, why = recipe.mamba_out_proj, "Mamba out_proj"
        elif kind == "attention":
            fmt, why = recipe.attention, "attention projections"
        elif kind == "latent_proj":
            fmt, why = recipe.latent_projections, "LatentMoE latent projections"
        else:
            fmt, why = "nvfp4", "default"
        out.append(LayerPlan(name, kind, fmt, why))
    return out


class Quantization:
    """What apply_recipe did to a model: the plan, the converted modules, their statistics and the SR generator."""

    def __init__(self, recipe: NVFP4Recipe, layer_plan: list[LayerPlan], modules: dict, generator):
        self.recipe, self.plan, self.modules, self.generator = recipe, layer_plan, modules, generator

    def reseed(self, step: int, rank: int = 0) -> None:
        """Stochastic rounding draws from a generator seeded by (seed, step, rank): a resumed run repeats it exactly."""
        self.generator.manual_seed((self.recipe.seed * 1_000_003 + step) * 4099 + rank)

    def monitor(self, on: bool) -> None:
        for m in self.modules.values():
            m.monitor = on

    def stats(self) -> dict[str, dict[str, float]]:
        """Per converted layer: flush-to-zero shares (act, weight, grad), relative errors, zero share of wgrad,
        averaged since the last call; layers with nothing recorded are left out."""
        return {name: s for name, m in self.modules.items() if (s := m.stats.summary())}


def apply_recipe(model: nn.Module, recipe: NVFP4Recipe | None = None) -> Quantization:
    """Convert `model` in place: nn.Linear layers planned as nvfp4/mxfp8 become QuantLinear (sharing their
    parameters), routed experts get a quantized per-expert GEMM. Call before building the optimizer or after: the
    parameters are the same objects either way."""
    recipe = recipe or NVFP4Recipe()
    layer_plan = plan(model, recipe)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device if device.type != "meta" else "cpu")
    fused = recipe.fused == "on" or (recipe.fused == "auto" and device.type == "cuda")
    modules = {}
    for p in layer_plan:
        if p.format == "high":
            continue
        fmt = GemmFormat(p.format, recipe.rht, recipe.stochastic_rounding, recipe.weight_tile_2d, recipe.signs, fused)
        parent_name, _, leaf = p.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        mod = getattr(parent, leaf)
        if isinstance(mod, nn.Linear):
            q = QuantLinear(mod, fmt, generator)
            setattr(parent, leaf, q)
        else:
            q = mod.linear = QuantExpertLinear(fmt, generator)
        modules[p.name] = q
    quant = Quantization(recipe, layer_plan, modules, generator)
    quant.reseed(0)
    return quant


def explain(layer_plan: list[LayerPlan]) -> str:
    """A table of every GEMM layer's format and why, then the counts per format."""
    w = max(len(p.name) for p in layer_plan)
    lines = [f"{'layer':<{w}}  {'kind':<13} {'format':<6}  reason"]
    lines += [f"{p.name:<{w}}  {p.kind:<13} {p.format:<6}  {p.reason}" for p in layer_plan]
    counts = {f: sum(p.format == f for p in layer_plan) for f in FORMATS}
    lines.append("totals: " + ", ".join(f"{c} {f}" for f, c in counts.items()))
    return "\n".join(lines)
