"""Scale-out applied from outside the model (torchtitan's parallelize): FSDP2 sharding per block, expert
parallelism, tensor parallelism, activation checkpointing, mixed precision and CPU offload, on torch's own
DeviceMesh / DTensor.

    torchrun --nproc_per_node 4 -m nemotron3 train --preset tiny --ep 2     # dp 2 x ep 2, FSDP2 on
    torchrun --nproc_per_node 4 -m nemotron3 train --preset tiny --tp 2     # dp 2 x tp 2 (meant for GPUs)
    torchrun --nproc_per_node 2 -m nemotron3 train --preset tiny --no-fsdp  # replicated weights, summed grads
    torchrun --nproc_per_node 4 -m nemotron3 train --preset tiny --cp 2     # dp 2 x cp 2: rows split in halves

Meshes (world = dp * ep * cp, or dp * tp; expert parallelism borrows its ranks from data parallelism, as in
torchtitan: every rank reads its own batch, and a group of ep ranks shares one copy of the experts; the cp ranks of a
group, consecutive, read the same rows and each computes its slice of the sequence, context_parallel.py):
    mesh ("dp", "ep", "cp")  experts: Shard(0) over ep (parallel experts), then FSDP2 over dp x cp ("dp_cp")
    flattened "dp_ep_cp"     everything else: FSDP2 over all ranks (embeddings + head + norm_f in the root unit)
    mesh ("dp", "tp")    --tp: the tp ranks of a group read the same batch; Megatron's column / row split inside
                         each block (below), then FSDP2 over dp
Tensor parallel (Megatron-LM §3): attention q/k/v column-wise (each tp rank computes H/tp query heads and
n_kv/tp key/value heads), o_proj row-wise (partial sums all-reduced); dense MLPs and the shared expert up_proj
column-wise, down_proj row-wise. So one all-reduce per mixer in forward and one in backward. Mamba-2 stays
replicated: its in_proj output packs [z | x | B | C | dt] (widths H*P, H*P, G*N, G*N, H), so a contiguous row split
of in_proj would hand a rank pieces of several parts; a correct split (z, x, dt and conv1d / A / D / dt_bias by
head, B and C by group, the gated norm per group, out_proj row-wise) needs the mixer to know its local widths. The
routed experts, router and LatentMoE projections stay replicated too (expert parallelism is their split).
Tensor parallelism is for GPUs (NVLink); it runs on gloo (tested) but buys nothing on CPU. --tp and --ep together
are not supported yet.
Gradients are summed over ranks, never averaged (divide factor 1, SUM collectives), because the trainer divides
each rank's loss by the global totals already; so any (dp, ep) gives the one-process gradient of the global batch.
The bias update reads expert loads summed over every data-parallel rank (trainer.py), the whole dp x ep group.
Context parallelism shards FSDP2 over the cp ranks too (torchtitan's dp_shard_cp): they hold different tokens, so
their gradients are summed like those of data-parallel ranks.
torch.compile per block (--compile-blocks): each block compiled on its own (torchtitan), so a graph break or a
recompilation stays inside one block.
Left out: pipeline parallelism, tensor parallel Mamba-2 (above), --cp with --tp.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..model.moe import MoE
from .context_parallel import apply_context_parallel, check_context_parallel
from .expert_parallel import shard_experts


def blocks(model) -> list:
    """The modules FSDP2 shards one by one (a unit each): every block of the hybrid stack, and the MTP module as
    one unit (its first layer's eh_proj / norms run outside that layer's forward, and its block may be applied
    once per depth)."""
    return list(model.backbone.layers) + ([model.mtp] if model.mtp is not None else [])


def parallelize(model, world: int, ep: int = 1, fsdp: bool = True, act_ckpt: bool = False,
                cpu_offload: bool = False, bf16: bool = False, device: torch.device | None = None, tp: int = 1,
                cp: int = 1, compile_blocks: bool = False):
    """Apply tensor parallelism, context parallelism, activation checkpointing, expert parallelism and FSDP2 to
    `model` in place (every rank must hold the same weights, or all be on the meta device). Returns the
    ("dp", "ep", "cp") or ("dp", "tp") DeviceMesh, or None when nothing is sharded (one rank, or --no-fsdp).
    bf16: FSDP2 mixed precision (bf16 compute copies of the weights, fp32 gradient reduction), for GPUs.
    device: where the weights will live, for a model still on the meta device (filled after sharding).
    compile_blocks: torch.compile every block on its own (after checkpointing, before sharding, as torchtitan)."""
    if world % ep:
        raise ValueError(f"--ep {ep} does not divide the {world} ranks; use an ep that divides --nproc_per_node.")
    if world % tp:
        raise ValueError(f"--tp {tp} does not divide the {world} ranks; use a tp that divides --nproc_per_node.")
    if world % (ep * cp):
        with_ep = f" x --ep {ep}" if ep > 1 else ""
        raise ValueError(f"--cp {cp}{with_ep} does not divide the {world} ranks; use a cp{with_ep} that divides "
                         f"--nproc_per_node.")
    if tp > 1 and ep > 1:
        raise ValueError("--tp and --ep together are not supported yet; use one of them.")
    if tp > 1 and cp > 1:
        raise ValueError("--tp and --cp together are not supported yet; use one of them.")
    for name, n in (("tp", tp), ("cp", cp)):
        if n > 1 and (world == 1 or not fsdp):
            raise ValueError(f"--{name} {n} needs torchrun with at least {n} processes and FSDP2 (drop --no-fsdp).")
    if cp > 1:
        check_context_parallel(model.config, cp)
    if act_ckpt:
        from torch.distributed._composable import checkpoint
        for block in blocks(model):
            checkpoint(block)                    # recompute each block's activations in backward; names unchanged
    if compile_blocks:
        for block in blocks(model):
            block.compile()                      # in place: parameter names and FSDP2 units unchanged
    if world == 1 or not fsdp:
        if ep > 1:
            raise ValueError(f"--ep {ep} needs FSDP2 across ranks; drop --no-fsdp (and run under torchrun).")
        return None
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    device = device or next(model.parameters()).device
    if tp > 1:
        mesh = init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
        tensor_parallel(model, mesh["tp"])
        every_rank = mesh["dp"]                  # FSDP2 over the data-parallel ranks; tp ranks hold other columns
    else:
        mesh = init_device_mesh(device.type, (world // (ep * cp), ep, cp), mesh_dim_names=("dp", "ep", "cp"))
        every_rank = mesh["dp", "ep", "cp"]._flatten("dp_ep_cp")
        if cp > 1:
            apply_context_parallel(model, mesh["cp"])
    policy = dict(mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if bf16 else MixedPrecisionPolicy(),
                  offload_policy=CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload
                  else OffloadPolicy())
    units = []
    if ep > 1:
        for moe in (m for m in model.modules() if isinstance(m, MoE)):
            shard_experts(moe.experts, mesh["ep"])
            units.append(fully_shard(moe.experts, mesh=mesh["dp", "cp"]._flatten("dp_cp") if cp > 1 else mesh["dp"],
                                     **policy))
    units += [fully_shard(b, mesh=every_rank, **policy) for b in blocks(model)]
    units.append(fully_shard(model, mesh=every_rank, **policy))
    for unit in units:                       # plain sums: the loss is already normalised over the global batch
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)     # gloo has no PREMUL_SUM / AVG
    return mesh


def tensor_parallel(model, tp_mesh) -> None:
    """Megatron's column / row split of attention and the dense MLPs over the 1-D `tp_mesh` (see the module
    docstring): the block input stays replicated, each rank computes its heads / hidden columns, and the row-wise
    output projection all-reduces the partial sums back to a replicated output."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from ..model.attention import Attention
    from ..model.mlp import MLP
    tp = tp_mesh.size()
    for module in model.modules():
        if isinstance(module, Attention):
            if module.num_kv_heads % tp:
                raise ValueError(f"--tp {tp} does not divide num_key_value_heads={module.num_kv_heads}; use a tp "
                                 f"that divides it.")
            parallelize_module(module, tp_mesh, {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(),
                                                 "v_proj": ColwiseParallel(), "o_proj": RowwiseParallel()})
            module.num_heads //= tp              # the local heads the rank's q / k / v columns hold
            module.num_kv_heads //= tp
        elif isinstance(module, MLP):
            parallelize_module(module, tp_mesh, {"up_proj": ColwiseParallel(), "down_proj": RowwiseParallel()})


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_ for gradients that may be sharded DTensors on different meshes (FSDP2 over all
    ranks, experts over dp x ep): every shard covers its parameter once across the world, so the squared norms of
    the local shards, summed over ranks, are the global squared norm; a shard that several ranks hold alike (a
    weight that tensor parallelism leaves whole, held by every tp rank) counts once. Returns the norm before
    clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    sharded = any(isinstance(g, DTensor) for g in grads)
    copies = [_copies(g) if sharded else 1 for g in grads]
    sq = torch.stack([g.float().pow(2).sum() / c for g, c in zip(local, copies)]).sum() if local else torch.zeros(())
    if sharded:
        dist.all_reduce(sq)
    norm = sq.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)      # torch's rule: scale only when the norm exceeds max_norm
    for g in local:
        g.mul_(coef.to(g.dtype))
    return float(norm)


def _copies(t) -> int:
    """How many ranks hold the same local tensor as this one: the ranks outside the DTensor's mesh, times its mesh
    dimensions it is replicated over (a plain tensor: every rank)."""
    world = dist.get_world_size()
    if not isinstance(t, DTensor):
        return world
    mesh = t.device_mesh
    return world // mesh.size() * math.prod(mesh.size(i) for i, p in enumerate(t.placements) if p.is_replicate())


def full_state_dict(model) -> dict:
    """The whole model's state dict as plain CPU tensors on rank 0 (a collective: every rank calls it; other
    ranks get {}). For a model that is not sharded, its own state dict."""
    if not is_sharded_model(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def is_sharded_model(model) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())
