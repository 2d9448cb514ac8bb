"""Mixture of experts: sigmoid router with e_score_correction_bias and group-limited top-k, relu² experts computed
only for the tokens routed to them (sorted and grouped by expert), one shared expert.

Dimensions: T tokens, D model width d, L expert input width (d, or l for LatentMoE), E experts, K top-k, m expert
hidden. Suffixes name a tensor's shape (torchtitan): x_TD is (T, d); ids_TK is (T, K).

Router (DeepSeek-V3 / Nemotron, HF NemotronHTopkRouter), in float32:
    s = sigmoid(x W_r^T);  choose top-K of s + b (b = e_score_correction_bias, used for the choice only);
    with n_group > 1 a group is scored by the sum of its top-2 choice scores, and only the topk_group best groups
    may be chosen from;  weights w = s[chosen] / (sum s[chosen] + 1e-20) (if norm_topk_prob) * routed_scaling_factor.
    out = sum_k w_k * E_{id_k}(x) + Shared(x),  E_e(x) = down_e(relu(up_e x)^2).

The router, the experts and the dispatch are separate pieces so a trainer can update the bias (aux-loss-free
balancing) and expert parallelism can replace `routed_experts` (tokens -> experts -> combine) from outside.
In training mode each MoE layer adds its (token, slot) assignments per expert to the buffer `tokens_per_expert`
(torchtitan's name), which the trainer reads and zeroes once per optimizer step for the bias update; a forward
that needs the routing itself (the sequence aux loss) passes a dict `routing` that receives {layer_idx: RouterOutput}.
Router replay (RL): a `Routing` dict may also carry forced expert ids per layer; the layer then uses those top-K ids
instead of its own choice, with weights still computed from its router scores over them (so the router stays in the
graph), and the trainer recomputes log-probabilities with the experts the inference engine routed each token to.
Nothing is switched on or left behind on the modules between calls.
Expert weights are fused 3-D parameters, experts.up_proj (E, m, L) and experts.down_proj (E, L, m), as in HF's
memory layout; checkpoint.py maps them to the per-expert keys on disk. The dispatch loops over experts that got
tokens (never over tokens); on CPU this beats torch's grouped_mm (measured 1.1 ms vs 1.4 ms, E=16, T*K=2048), whose
CPU backward also fails in torch 2.13.
"""

from __future__ import annotations

from collections import UserDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .mlp import MLP, relu2


@dataclass
class RouterOutput:
    weights_TK: torch.Tensor    # combine weights, float32
    ids_TK: torch.Tensor        # chosen experts
    scores_TE: torch.Tensor     # sigmoid scores (uncorrected), float32, for balancing losses and statistics


class Routing(UserDict):
    """A `routing` mapping ({layer_idx: RouterOutput} of one forward) that may also force the choice of experts:
    replay {layer_idx: ids_TK} (router replay; layers not in it route as usual). A UserDict, not a dict: FSDP2
    rebuilds the dicts among a unit's inputs (pytree), so the layers after the first would record into copies;
    pytree passes a UserDict through as one leaf."""

    def __init__(self, replay: dict[int, torch.Tensor] | None = None):
        super().__init__()
        self.replay = replay or {}


class TopKRouter(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.norm_topk_prob, self.scaling = config.norm_topk_prob, config.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(self.num_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))

    def forward(self, x_TD: torch.Tensor, forced_ids_TK: torch.Tensor | None = None) -> RouterOutput:
        """forced_ids_TK (T, K): use these experts instead of the top-K choice (router replay)."""
        scores_TE = torch.sigmoid(F.linear(x_TD.float(), self.weight.float()))
        if forced_ids_TK is not None:
            return self._weights(scores_TE, forced_ids_TK.to(x_TD.device, torch.long))
        choice_TE = scores_TE + self.e_score_correction_bias.float()
        if self.n_group > 1:    # keep the topk_group groups whose top-2 choice scores sum highest
            groups = choice_TE.unflatten(-1, (self.n_group, -1))                      # (T, n_group, E/n_group)
            group_score = groups.topk(2, dim=-1).values.sum(-1)                       # (T, n_group)
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(self.topk_group, dim=-1, sorted=False).indices, True)
            choice_TE = groups.masked_fill(~keep[..., None], float("-inf")).flatten(1)
        return self._weights(scores_TE, choice_TE.topk(self.top_k, dim=-1, sorted=False).indices)

    def _weights(self, scores_TE: torch.Tensor, ids_TK: torch.Tensor) -> RouterOutput:
        weights_TK = scores_TE.gather(1, ids_TK)
        if self.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)
        return RouterOutput(weights_TK * self.scaling, ids_TK, scores_TE)


class Experts(nn.Module):
    """E relu² experts stored fused: up_proj (E, m, L), down_proj (E, L, m), used as F.linear weights."""

    def __init__(self, num_experts: int, input_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, input_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, input_size, intermediate_size))
        nn.init.normal_(self.up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)
        self.linear = F.linear     # per-expert GEMM; quantized training swaps it from outside (quant/recipe.py)

    def forward(self, x_TL: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                schedule: str = "sorted") -> torch.Tensor:
        """schedule: one of SCHEDULES, chosen by the caller (see routed_experts)."""
        if self.linear is not F.linear:
            return _sorted_experts(x_TL, ids_TK, weights_TK, self.up_proj, self.down_proj, self.linear)
        return routed_experts(x_TL, ids_TK, weights_TK, self.up_proj, self.down_proj, schedule)


SCHEDULES = ("sorted", "one_token", "gathered")
"""The schedules of routed_experts: sorted (training, prefill, expert parallelism: the dispatch / experts / combine
steps), one_token (one token's K experts in place; inference only: its combine weights enter as plain numbers, so
they get no gradient), gathered (the chosen experts' weights in one batched matmul)."""


def decode_schedule(T: int, K: int, num_experts: int, device_type: str, compiled: bool) -> str:
    """The fastest schedule for an inference (no-gradient) call on T tokens, from facts the caller knows: the token
    count, the device and whether the call runs inside torch.compile. Compiled (decode, verification, whatever the
    batch): gathered, the only one without a host sync, so the step stays one graph (sorted's per-expert split
    breaks it; measured on `small`, batch 8 verify passes: the broken graphs also slowed every later plain step
    by ~25%). Eager: one_token for one token on CPU (no sort, no weight copy), gathered for few tokens on GPUs,
    otherwise (prefill) sorted."""
    if compiled:
        return "gathered"
    if device_type == "cpu" and T == 1:
        return "one_token"
    if device_type != "cpu" and T * K <= max(num_experts, 64):
        return "gathered"
    return "sorted"


def routed_experts(x_TL, ids_TK, weights_TK, up_EML, down_ELM, schedule: str = "sorted"):
    """sum_k w_k * down[id_k](relu(up[id_k] x)^2), computing each expert once on all of its tokens, by one of three
    schedules of the same sum (SCHEDULES). The caller picks it: training and expert parallelism "sorted" (the only
    one with cheap gradients), an inference path decode_schedule(...) (Block does: sorted without a cache,
    decode_schedule with one); nothing is inferred from grad mode or compilation state."""
    T, K = ids_TK.shape
    if schedule == "one_token":
        if T != 1:
            raise ValueError(f"schedule one_token is for a single token; got {T} tokens (use sorted or gathered).")
        x = x_TL[0]
        return sum(w * F.linear(relu2(F.linear(x, up_EML[e])), down_ELM[e])
                   for e, w in zip(ids_TK[0].tolist(), weights_TK[0].tolist()))[None]
    if schedule == "gathered":    # gather the chosen experts' weights, no host sync (compile stays one graph)
        flat_ids = ids_TK.reshape(-1)                                          # (T*K,)
        h = torch.bmm(up_EML[flat_ids], x_TL.repeat_interleave(K, dim=0)[:, :, None])      # (TK, m, 1)
        y = torch.bmm(down_ELM[flat_ids], relu2(h)).squeeze(-1)                             # (TK, L)
        return (y * weights_TK.reshape(-1, 1).to(y.dtype)).view(T, K, -1).sum(1)
    if schedule != "sorted":
        raise ValueError(f"schedule {schedule!r} is not one of {SCHEDULES}.")
    return _sorted_experts(x_TL, ids_TK, weights_TK, up_EML, down_ELM)


def _sorted_experts(x_TL, ids_TK, weights_TK, up_EML, down_ELM, linear=F.linear):
    """The general path, in the three steps expert parallelism splits across ranks (torchtitan's token reorderer,
    grouped experts, combine): sort the T*K (token, expert) slots by expert, run each expert once on its tokens,
    weigh and add each slot back onto its token."""
    order, counts = dispatch_order(ids_TK, up_EML.shape[0])
    x_sorted = x_TL[order // ids_TK.shape[1]]                                  # (TK, L)
    y_sorted = grouped_experts(x_sorted, counts.tolist(), up_EML, down_ELM, linear)
    return combine_slots(y_sorted, order, weights_TK, x_TL)


def dispatch_order(ids_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order (T*K,): slot indices sorted by expert, stably; counts (E,): slots per expert). Slot s = t*K + k."""
    flat_ids = ids_TK.reshape(-1)
    return torch.argsort(flat_ids, stable=True), torch.bincount(flat_ids, minlength=num_experts)


def grouped_experts(x_sorted: torch.Tensor, counts: list[int], up_EML, down_ELM, linear=F.linear) -> torch.Tensor:
    """Rows grouped by expert (counts[e] rows for expert e, in order) -> down_e(relu(up_e x)^2) row by row."""
    # unbind once: indexing up_EML[e] per expert would make backward allocate and add a full (E, m, L) gradient
    # for every expert (measured: 4 s of an 8.5 s training step of the 290M benchmark config)
    ups, downs = up_EML.unbind(0), down_ELM.unbind(0)
    outs = [linear(relu2(linear(x_e, ups[e])), downs[e]) for e, x_e in enumerate(x_sorted.split(counts)) if counts[e]]
    if not outs:                        # no rows (an expert-parallel rank that received nothing): keep the graph
        return x_sorted[:0] + 0 * (up_EML.sum() + down_ELM.sum())
    return torch.cat(outs)                                                     # (rows, L)


def combine_slots(y_sorted: torch.Tensor, order: torch.Tensor, weights_TK: torch.Tensor, x_TL: torch.Tensor):
    """out_t = sum_k w_{t,k} y_{t,k}: weigh each expert output and add it onto its token. (T*K, L) -> (T, L)."""
    y_sorted = y_sorted * weights_TK.reshape(-1)[order, None].to(x_TL.dtype)
    return torch.zeros_like(x_TL).index_add_(0, order // weights_TK.shape[1], y_sorted)


class MoE(nn.Module):
    """Standard MoE layer (experts in width d). See latent_moe.py for LatentMoE."""

    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.gate = TopKRouter(config)
        self.experts = Experts(config.n_routed_experts, config.expert_input_size, config.moe_intermediate_size)
        self.shared_experts = MLP(config.hidden_size, config.moe_shared_expert_intermediate_size, config.mlp_bias)
        # (E,) assignments routed to each expert by training forwards since the trainer last zeroed it
        self.register_buffer("tokens_per_expert", torch.zeros(config.n_routed_experts, dtype=torch.long),
                             persistent=False)

    def route(self, x_TD: torch.Tensor, routing: dict | None = None) -> RouterOutput:
        r = self.gate(x_TD, routing.replay.get(self.layer_idx) if isinstance(routing, Routing) else None)
        if routing is not None:
            routing[self.layer_idx] = r
        # count once per token: not again when activation checkpointing recomputes this layer inside backward
        if self.training and torch._C._current_graph_task_id() == -1:
            with torch.no_grad():
                self.tokens_per_expert += torch.bincount(r.ids_TK.reshape(-1), minlength=self.gate.num_experts)
        return r

    def route_and_run(self, x_TD: torch.Tensor, routing: dict | None = None, schedule: str = "sorted"):
        """Routed part only: (T, d) -> (T, d)."""
        r = self.route(x_TD, routing)
        return self.experts(x_TD, r.ids_TK, r.weights_TK, schedule)

    def forward(self, x: torch.Tensor, routing: dict | None = None, schedule: str = "sorted") -> torch.Tensor:
        """x (..., d). routing: a dict that receives {layer_idx: RouterOutput} of this call, or None. schedule: the
        routed experts' schedule (routed_experts, SCHEDULES): sorted for training, decode_schedule(...) for
        inference."""
        x_TD = x.reshape(-1, x.shape[-1])
        out = self.route_and_run(x_TD, routing, schedule) + self.shared_experts(x_TD)
        return out.view_as(x)
