"""Memory planner: per-GPU bytes of a training layout before renting the GPUs.

    nemotron3 plan --preset nano-30b-a3b --gpus 64 --dp 8 --ep 8 --seq-len 8192 --micro-batch 1
    nemotron3 plan --preset super-120b-a12b --gpus 64 --ep 64 --seq-len 8192 --precision nvfp4 --act-ckpt

The layout is the trainer's (parallelize.py): gpus = dp * ep * tp * cp; every rank reads its own micro-batch, except
that the cp ranks of a group share theirs and each holds seq_len / cp tokens of every row (context parallelism:
activations and all-to-all buffers / cp); routed experts are split E/ep per rank and FSDP2-sharded over dp * cp;
everything else is FSDP2-sharded over all dp * ep * cp ranks
(and split tp ways by tensor parallelism, modelled as Megatron TP + sequence parallel: block weights and block
activations / tp). Per rank, with P_x the parameters of part x:
    parameters   4 B * (P_dense / (dp ep tp) + P_experts / (dp ep))       fp32 shards (the optimizer's master copy)
    gradients    4 B * the same                                          fp32 shards (reduce-scatter in fp32)
    optimizer    8 B * the same (AdamW: two fp32 moments)
    gathered     c B * (P_root + 2 * largest block unit)                 FSDP2 keeps the root unit (embeddings,
                 head, norm_f) gathered through the step and prefetches one block while computing another;
                 c = 4 (fp32) or 2 (bf16 mixed precision and nvfp4)
    activations  the tensors saved for backward: measured per layer kind by running one real block of the model's
                 widths (experts cut down to top-k of them; saved bytes depend on tokens * k, not on E) on a short
                 sequence under autograd's saved-tensor hooks, times tokens / tp; plus the fused LM head's fp32
                 (V, d) weight-gradient buffer per loss call (main + each MTP depth). With --act-ckpt: each block's
                 input (4 B d per token) + one block recomputed.
    all-to-all   expert parallel only: one layer's send and receive buffers, 2 * tokens * k * L * c B
peak = parameters + optimizer + gathered + activations + all-to-all + gradients + one unit's unsharded gradients
(twice: FSDP2 copies them into the reduce-scatter input): the start of backward holds every activation while the
first gradients and backward's temporaries appear (measured on CPU: more than the gradients of the whole model).
Left out: the CUDA context and allocator fragmentation
(the "fits" column keeps 10% of the GPU free for them), pipeline parallelism, context parallelism's own all-to-all
buffers (one mixer's q/k/v or x/B/C at a time, small next to the saved activations), NVFP4's packed weights
(nvfp4 is planned at bf16 compute width, as our emulated recipe runs it).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from ..config import from_preset
from .trainer import config_flags

GPU_SIZES_GB = (80, 141, 192)


@dataclass
class PlanConfig:
    preset: str = "nano-30b-a3b"
    """Architecture preset (nemotron3 info --list)."""
    gpus: int = 8
    """Total GPUs (ranks) = dp * ep * tp * cp."""
    dp: int = 0
    """Data-parallel degree (0 = gpus / (ep * tp * cp))."""
    ep: int = 1
    """Expert-parallel degree (E / ep experts per rank)."""
    tp: int = 1
    """Tensor-parallel degree (modelled: block weights and activations / tp)."""
    cp: int = 1
    """Context-parallel degree (each rank holds seq_len / cp tokens of its group's rows)."""
    seq_len: int = 8192
    """Tokens per sequence."""
    micro_batch: int = 1
    """Sequences per rank per micro-batch."""
    precision: str = "bf16"
    """fp32, bf16 (FSDP2 mixed precision) or nvfp4."""
    act_ckpt: bool = False
    """Activation checkpointing per block."""
    mtp_depths: int = 2
    """MTP depths trained (0 if the model has no MTP heads)."""
    optimizer: str = "adamw"
    """adamw (8 B of state per parameter) or sgd (none)."""

    def validate(self) -> None:
        if self.precision not in ("fp32", "bf16", "nvfp4"):
            raise ValueError(f"--precision {self.precision}: use fp32, bf16 or nvfp4.")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"--optimizer {self.optimizer}: use adamw or sgd.")
        for name in ("gpus", "ep", "tp", "cp", "seq_len", "micro_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} must be >= 1.")
        dp = self.dp or self.gpus // (self.ep * self.tp * self.cp)
        if dp < 1 or dp * self.ep * self.tp * self.cp != self.gpus:
            raise ValueError(f"--gpus {self.gpus} must equal dp * ep * tp * cp = {self.dp or '?'} * {self.ep} * "
                             f"{self.tp} * {self.cp}; change --dp, --ep, --tp or --cp.")


def _is_expert(name: str) -> bool:
    return ".experts." in name


def parameter_split(config) -> dict:
    """Parameter counts (meta device, nothing allocated): root (embeddings, head, norm_f), and per FSDP unit (each
    block, the MTP module) its dense and expert parts."""
    from ..model import NemotronForCausalLM
    with torch.device("meta"):
        model = NemotronForCausalLM(config)
    units = list(model.backbone.layers) + ([model.mtp] if model.mtp is not None else [])
    per_unit = [dict(dense=sum(p.numel() for n, p in u.named_parameters() if not _is_expert(n)),
                     experts=sum(p.numel() for n, p in u.named_parameters() if _is_expert(n))) for u in units]
    total = sum(p.numel() for p in model.parameters())
    root = total - sum(u["dense"] + u["experts"] for u in per_unit)
    return dict(root=root, units=per_unit, total=total, experts=sum(u["experts"] for u in per_unit))


@torch.no_grad()
def _probe_config(config):
    """The config with only top-k (at least n_group) experts: a block of it saves what the full block saves."""
    E = max(config.num_experts_per_tok, config.n_group)
    E += (-E) % config.n_group
    return config.replace(n_routed_experts=E, topk_group=min(config.topk_group, config.n_group))


def saved_bytes_per_token(config, kind: str, precision: str = "fp32") -> float:
    """Bytes autograd saves for backward per token in one block of `kind` (its input included, its weights and
    their autocast copies not): the slope of the saved bytes between one and two Mamba chunks of random tokens
    (per-call constants, such as bf16 copies of the weights, drop out of the slope)."""
    key = (repr(config), kind, precision)
    if key not in _PROBED:
        t1 = max(64, config.chunk_size)
        _PROBED[key] = (_saved_bytes(config, kind, precision, 2 * t1) - _saved_bytes(config, kind, precision, t1)) / t1
    return _PROBED[key]


_PROBED: dict[tuple, float] = {}          # (config, kind, precision) -> bytes per token: a probe costs seconds



def _saved_bytes(config, kind: str, precision: str, tokens: int) -> int:
    """Bytes of the distinct storages autograd saves in one forward of a `kind` block over `tokens` tokens."""
    from ..model.nemotron import Block
    torch.manual_seed(0)
    block = Block(_probe_config(config), 0, kind).train()
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            saved[s.data_ptr()] = max(saved.get(s.data_ptr(), 0), s.nbytes())
        return t

    x = torch.randn(1, tokens, config.hidden_size, requires_grad=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "fp32")
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        block(x)
    return sum(saved.values())


def plan(cfg: PlanConfig, config=None) -> dict:
    """Per-rank bytes of each part and the peak (see the module docstring); config: a NemotronConfig instead of
    cfg.preset."""
    cfg.validate()
    config = config or from_preset(cfg.preset)
    dp, ep, tp, cp = cfg.dp or cfg.gpus // (cfg.ep * cfg.tp * cfg.cp), cfg.ep, cfg.tp, cfg.cp
    if config.n_routed_experts % ep:
        raise ValueError(f"--ep {ep} does not divide the {config.n_routed_experts} experts of {cfg.preset}.")
    world = dp * ep * tp * cp
    split = parameter_split(config)
    dense = split["total"] - split["experts"]
    local = dense / (world if world > 1 else 1) + split["experts"] / (dp * cp * ep)
    c = 4 if cfg.precision == "fp32" else 2
    sharded = world > 1
    if sharded:
        unit = max(u["dense"] / tp + u["experts"] / ep for u in split["units"])
        gathered = c * (split["root"] + 2 * unit)
        unit_grads = 8 * unit            # one unit's unsharded fp32 gradients + the reduce-scatter's input copy
    else:
        gathered = c * split["total"] if c != 4 else 0        # one process: the weights themselves (bf16 copies)
        unit_grads = 0
    tokens = cfg.seq_len * cfg.micro_batch / cp                 # this rank's share of its rows
    depths = cfg.mtp_depths if config.num_nextn_predict_layers else 0
    layers = list(config.layers_block_type) + list(config.mtp_layers_block_type) * depths
    per_kind = {k: saved_bytes_per_token(config, k, cfg.precision) for k in set(layers)}
    d, V = config.hidden_size, config.vocab_size
    if cfg.act_ckpt:
        acts = tokens * (4 * d * len(layers) + max(per_kind.values()) / tp)
    else:
        acts = tokens * sum(per_kind[k] for k in layers) / tp
    head = (1 + depths) * 4 * V * d + tokens * (1 + depths) * 4 * d * 3     # dW buffer; h, dh, norm_f per call
    acts += head
    L = config.expert_input_size
    a2a = 2 * tokens * config.num_experts_per_tok * L * c if ep > 1 else 0
    out = dict(parameters=4 * local, gradients=4 * local, optimizer=(8 if cfg.optimizer == "adamw" else 0) * local,
               gathered=gathered, activations=acts, all_to_all=a2a)
    out["peak"] = out["parameters"] + out["optimizer"] + gathered + acts + a2a + out["gradients"] + unit_grads
    out["a2a_bytes_per_token"] = 2 * config.num_experts_per_tok * L * c * (ep - 1) / ep if ep > 1 else 0
    return out


def report(cfg: PlanConfig, result: dict) -> str:
    gib = 2 ** 30
    dp = cfg.dp or cfg.gpus // (cfg.ep * cfg.tp * cfg.cp)
    lines = [f"{cfg.preset} on {cfg.gpus} GPUs (dp {dp} x ep {cfg.ep} x tp {cfg.tp} x cp {cfg.cp}), {cfg.micro_batch}"
             f" x {cfg.seq_len} tokens per {'cp group' if cfg.cp > 1 else 'rank'}, {cfg.precision}{', activation checkpointing' if cfg.act_ckpt else ''}",
             "per GPU:"]
    for k in ("parameters", "gradients", "optimizer", "gathered", "activations", "all_to_all", "peak"):
        lines.append(f"  {k:<12} {result[k] / gib:9.2f} GiB")
    if cfg.ep > 1:
        lines.append(f"  all-to-all traffic {result['a2a_bytes_per_token'] / 1024:.1f} KiB per token per MoE layer")
    fits = [f"{g} GB: {'fits' if result['peak'] <= 0.9 * g * 1e9 else 'does not fit'}" for g in GPU_SIZES_GB]
    lines.append("  " + ", ".join(fits) + " (10% kept free for the CUDA context and fragmentation)")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="nemotron3 plan", description=__doc__.split("\n")[0])
    config_flags(p, PlanConfig)
    cfg = PlanConfig(**vars(p.parse_args(argv)))
    print(report(cfg, plan(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
