"""Expert parallelism: each rank of an `ep` group of size P owns E/P of an MoE layer's experts, and the routed
(token, expert) slots travel to the rank owning their expert and back (GShard / DeepSeek-V3 style; torchtitan's
ExpertParallel). Applied from outside the model (parallelize.py): an `Experts` module becomes an
`ExpertParallelExperts` in place (same parameter names, so checkpoints do not change), its weights DTensors
sharded on dim 0 over the ep mesh. Per MoE layer and forward, with the three steps of moe.py split across ranks:

    order, c = dispatch_order(ids)          c_e: this rank's slots for expert e, grouped by expert = by owner rank
    c_recv    = all_to_all(c)               (P, E/P): how many slots each rank sends to each of my experts
    x_recv    = all_to_all(x[order])        rows arrive grouped by (source rank, local expert)
    y_recv    = grouped_experts(regroup(x_recv))                   my E/P experts, each once on all its rows
    y         = all_to_all(y_recv)          back to the source ranks, in the order they were sent
    out       = combine_slots(y, order, w)  weigh and add onto the tokens (the weights never travel)

The collectives are torch's autograd all-to-all (`all_to_all_single_autograd`, uneven splits; the backward is the
reverse all-to-all). The router, its bias and the shared expert stay replicated: routing happens on each rank's
own tokens before dispatch, so LatentMoE dispatches in its latent width l (d/l less traffic than a standard MoE).
The split sizes need one host sync per layer (the counts decide the message sizes). `rows_sent` counts the rows
that left the rank (dispatch + combine), for the traffic benchmark.
Left out: capacity factors / token dropping (none in Nemotron 3), overlapping communication with compute.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from ..model.moe import Experts, combine_slots, dispatch_order, grouped_experts


class ExpertParallelExperts(Experts):
    """Experts whose weights are sharded over an ep process group (E/P local experts per rank)."""

    ep_group: dist.ProcessGroup
    rows_sent: int

    def forward(self, x_TL: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                schedule: str = "sorted") -> torch.Tensor:
        """Always the sorted schedule, split across ranks: the others (one_token, gathered) are single-device
        shortcuts to the same sum, which an inference caller may ask for; here the experts live on other ranks."""
        P = dist.get_world_size(self.ep_group)
        E_local = self.num_experts // P
        order, counts_E = dispatch_order(ids_TK, self.num_experts)
        x_sorted = x_TL[order // ids_TK.shape[1]]                            # (TK, L) grouped by owner rank
        counts_recv = torch.empty_like(counts_E)
        dist.all_to_all_single(counts_recv, counts_E, group=self.ep_group)   # (P * E_local,) [source][local expert]
        counts_recv = counts_recv.view(P, E_local)
        send = counts_E.view(P, E_local).sum(1).tolist()                    # the one host sync of the layer
        recv = counts_recv.sum(1).tolist()
        x_recv = all_to_all_single_autograd(x_sorted, recv, send, self.ep_group)     # (sum recv, L)
        # regroup the received rows from (source rank, local expert) to (local expert, source rank)
        expert_of_row = torch.arange(P * E_local, device=counts_recv.device).remainder(E_local)
        expert_of_row = expert_of_row.repeat_interleave(counts_recv.reshape(-1))
        regroup = torch.argsort(expert_of_row, stable=True)
        up, down = (w.to_local() if isinstance(w, DTensor) else w for w in (self.up_proj, self.down_proj))
        y_grouped = grouped_experts(x_recv[regroup], counts_recv.sum(0).tolist(), up, down, self.linear)
        y_recv = torch.empty_like(y_grouped).index_copy(0, regroup, y_grouped)   # back to arrival order
        y_sorted = all_to_all_single_autograd(y_recv, send, recv, self.ep_group)    # (TK, L)
        me = dist.get_rank(self.ep_group)
        self.rows_sent += (sum(send) - send[me]) + (sum(recv) - recv[me])
        return combine_slots(y_sorted, order, weights_TK, x_TL)


def shard_experts(experts: Experts, ep_mesh) -> None:
    """Turn `experts` into ExpertParallelExperts over the 1-D mesh `ep_mesh`, in place: up_proj / down_proj become
    DTensors Shard(0) (each rank keeps its E/P experts; every rank must hold the same full weights beforehand)."""
    P = ep_mesh.size()
    if experts.num_experts % P:
        raise ValueError(f"--ep {P} does not divide the {experts.num_experts} experts of an MoE layer; use an ep "
                         f"that divides n_routed_experts.")
    for name in ("up_proj", "down_proj"):
        full = getattr(experts, name)
        setattr(experts, name, nn.Parameter(distribute_tensor(full.detach(), ep_mesh, [Shard(0)]),
                                            requires_grad=full.requires_grad))
    experts.__class__ = ExpertParallelExperts
    experts.ep_group = ep_mesh.get_group()
    experts.rows_sent = 0
