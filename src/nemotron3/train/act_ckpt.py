"""Activation checkpointing per block: each residual block (Mamba, attention, MoE or MLP, main stack and MTP) keeps
only its input during the forward and recomputes its inside during the backward (torch.utils.checkpoint, the
non-reentrant form), so a long row's activation memory is one block's worth plus one (b, L, d) tensor per block
instead of every intermediate of every layer. Costs about one extra forward per step.

The recomputation must not count twice what the forward records: an MoE layer adds its routed tokens to
`tokens_per_expert` (the expert-bias update's statistics) on every training forward, so during a block's recompute
those counts are put back as they were. RNG state is replayed by torch.utils.checkpoint (dropout, if any, repeats).
Left out: selective checkpointing (saving some ops' outputs), offloading activations to the host.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ..model.moe import MoE


def _checkpointed(block, forward):
    moes = [m for m in block.modules() if isinstance(m, MoE)]

    def run(*args, **kwargs):
        if not (block.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        calls = [0]

        def body(*a, **kw):
            calls[0] += 1
            if calls[0] == 1:
                return forward(*a, **kw)
            counts = [m.tokens_per_expert.clone() for m in moes]          # recompute: leave the statistics alone
            try:                 # (torch stops a recompute early, by an exception, once it has what it needs)
                return forward(*a, **kw)
            finally:
                for m, c in zip(moes, counts):
                    m.tokens_per_expert.copy_(c)
        return checkpoint(body, *args, use_reentrant=False, **kwargs)
    return run


def enable_activation_checkpointing(model) -> int:
    """Checkpoint every residual block of `model` (backbone layers and MTP layers); returns how many. Idempotent."""
    blocks = list(model.backbone.layers) + (list(model.mtp.layers) if model.mtp is not None else [])
    for block in blocks:
        if not getattr(block, "_activation_checkpointed", False):
            block.forward = _checkpointed(block, block.forward)
            block._activation_checkpointed = True
    return len(blocks)
