"""Scale-out applied from outside the model (torchtitan's parallelize): FSDP2 sharding per block, expert
parallelism, activation checkpointing, mixed precision and CPU offload, on torch's own DeviceMesh / DTensor.

    torchrun --nproc_per_node 4 -m nemotron3 train --preset tiny --ep 2     # dp 2 x ep 2, FSDP2 on
    torchrun --nproc_per_node 2 -m nemotron3 train --preset tiny --no-fsdp  # replicated weights, summed grads

Meshes (world = dp * ep; expert parallelism borrows its ranks from data parallelism, as in torchtitan: every rank
reads its own batch, and a group of ep ranks shares one copy of the experts):
    mesh ("dp", "ep")    experts: Shard(0) over ep (parallel experts), then FSDP2 over dp
    flattened "dp_ep"    everything else: FSDP2 over all ranks (embeddings + head + norm_f in the root unit)
Gradients are summed over ranks, never averaged (divide factor 1, SUM collectives), because the trainer divides
each rank's loss by the global totals already; so any (dp, ep) gives the one-process gradient of the global batch.
The bias update reads expert loads summed over every rank (trainer.py), the whole dp x ep group.
Left out: tensor / sequence / context parallelism (context parallel for causal attention is CUDA-only in torch),
pipeline parallelism, torch.compile per block, loading a Hugging Face checkpoint without materialising it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..model.moe import MoE
from .expert_parallel import shard_experts


def blocks(model) -> list:
    """The modules FSDP2 shards one by one (a unit each): every block of the hybrid stack, and the MTP module as
    one unit (its first layer's eh_proj / norms run outside that layer's forward, and its block may be applied
    once per depth)."""
    return list(model.backbone.layers) + ([model.mtp] if model.mtp is not None else [])


def parallelize(model, world: int, ep: int = 1, fsdp: bool = True, act_ckpt: bool = False,
                cpu_offload: bool = False, bf16: bool = False, device: torch.device | None = None):
    """Apply activation checkpointing, expert parallelism and FSDP2 to `model` in place (every rank must hold the
    same weights). Returns the ("dp", "ep") DeviceMesh, or None when nothing is sharded (one rank, or --no-fsdp).
    bf16: FSDP2 mixed precision (bf16 compute copies of the weights, fp32 gradient reduction), for GPUs.
    device: where the weights will live, for a model still on the meta device (filled after sharding)."""
    if world % ep:
        raise ValueError(f"--ep {ep} does not divide the {world} ranks; use an ep that divides --nproc_per_node.")
    if act_ckpt:
        from torch.distributed._composable import checkpoint
        for block in blocks(model):
            checkpoint(block)                    # recompute each block's activations in backward; names unchanged
    if world == 1 or not fsdp:
        if ep > 1:
            raise ValueError(f"--ep {ep} needs FSDP2 across ranks; drop --no-fsdp (and run under torchrun).")
        return None
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    device = device or next(model.parameters()).device
    mesh = init_device_mesh(device.type, (world // ep, ep), mesh_dim_names=("dp", "ep"))
    every_rank = mesh["dp", "ep"]._flatten("dp_ep")
    policy = dict(mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if bf16 else MixedPrecisionPolicy(),
                  offload_policy=CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload
                  else OffloadPolicy())
    units = []
    if ep > 1:
        for moe in (m for m in model.modules() if isinstance(m, MoE)):
            shard_experts(moe.experts, mesh["ep"])
            units.append(fully_shard(moe.experts, mesh=mesh["dp"], **policy))
    units += [fully_shard(b, mesh=every_rank, **policy) for b in blocks(model)]
    units.append(fully_shard(model, mesh=every_rank, **policy))
    for unit in units:                       # plain sums: the loss is already normalised over the global batch
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)     # gloo has no PREMUL_SUM / AVG
    return mesh


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_ for gradients that may be sharded DTensors on different meshes (FSDP2 over all
    ranks, experts over dp x ep): every shard covers its parameter once across the world, so the squared norms of
    the local shards, summed over ranks, are the global squared norm. Returns the norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    sq = torch.stack([g.float().pow(2).sum() for g in local]).sum() if local else torch.zeros(())
    if any(isinstance(g, DTensor) for g in grads):
        dist.all_reduce(sq)
    norm = sq.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)      # torch's rule: scale only when the norm exceeds max_norm
    for g in local:
        g.mul_(coef.to(g.dtype))
    return float(norm)


def full_state_dict(model) -> dict:
    """The whole model's state dict as plain CPU tensors on rank 0 (a collective: every rank calls it; other
    ranks get {}). For a model that is not sharded, its own state dict."""
    if not is_sharded_model(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def is_sharded_model(model) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())
