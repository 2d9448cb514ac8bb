"""The loss of language-model training (pretraining and SFT): next-token cross-entropy, the MTP losses and the
MoE sequence aux loss, normalised over a whole optimizer step (see LMLoss). Written for the Trainer's interface:
`count(batch)` gives a micro-batch's share of the step totals, `loss(model, batch, totals)` its loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.nemotron import packed_sequence_index, shifted_targets
from .balance import sequence_aux_loss
from .context_parallel import sequence_slice


class LMLoss:
    """Next-token cross-entropy + MTP + the MoE sequence aux loss of one micro-batch, normalised by the step's
    totals (`count` summed over micro-batches and ranks):
        L = sum_t w_t l_t / Z_0  +  (lambda / D) sum_k sum_t w_t l^k_t / Z_k  +  aux / (number of micro-batches)
    normalization "token":    w_t = loss_weights (1 if absent), Z_k = sum of w_t over the step's valid targets of
                              depth k: the token-level global mean.
    normalization "sequence": w_t = loss_weights / (number of valid next-token targets in t's sequence), Z_k = the
                              number of sequences with one: L = (1/|B|) sum_c (1/|O_c|) sum_{t in O_c} l_t. The MTP
                              depths reuse the next-token weights (their targets differ only if labels begin within
                              a sequence's first k tokens).
    Depth k at position t predicts labels[t + k + 1] (MTP stays on in SFT).
    Under context parallelism (context_parallel(group)) the model's forward covers this rank's slice of each row:
    count() still counts whole rows, the accuracy is weighed by the slice's targets, and the sequence aux loss sums
    each sequence's expert counts over the group."""

    cp_group = None

    def __init__(self, mtp_depths: int = 0, mtp_lambda: float = 0.3, aux_coeff: float = 0.0,
                 normalization: str = "token"):
        self.mtp_depths, self.mtp_lambda, self.aux_coeff = mtp_depths, mtp_lambda, aux_coeff
        self.normalization = normalization

    @classmethod
    def from_config(cls, cfg, model) -> "LMLoss":
        """From a TrainerConfig's mtp_depths / mtp_lambda / aux_coeff / loss_normalization (no MTP if the model
        has no MTP heads)."""
        return cls(cfg.mtp_depths if model.mtp is not None else 0, cfg.mtp_lambda, cfg.aux_coeff,
                   cfg.loss_normalization)

    def context_parallel(self, group) -> None:
        """The model's forwards now cover this rank's slice of each row, the cp `group` sharing the rows."""
        self.cp_group = group

    def _targets_and_weights(self, batch):
        labels, mask = batch["labels"], batch.get("attention_mask")
        seq_idx = packed_sequence_index(batch["position_ids"]) if "position_ids" in batch else None
        targets = [shifted_targets(labels, mask, k + 1, seq_idx) for k in range(self.mtp_depths + 1)]
        weights = batch.get("loss_weights")
        if self.normalization == "sequence":   # 1 / |O_c| on every label of sequence c
            seq = seq_idx if seq_idx is not None else torch.zeros_like(labels)
            row_seq = seq + torch.arange(labels.shape[0], device=labels.device)[:, None] * labels.shape[1]  # unique
            valid = (targets[0] != -100).to(torch.float64)                    # position t predicts label t + 1
            per_seq = torch.zeros(labels.numel(), dtype=torch.float64, device=labels.device)
            per_seq.index_add_(0, row_seq.reshape(-1), valid.reshape(-1))
            inv = torch.where(per_seq > 0, 1.0 / per_seq.clamp(min=1), 0.0)[row_seq].to(torch.float32)
            weights = inv if weights is None else weights * inv
        return targets, weights, seq_idx

    def count(self, batch) -> dict[str, torch.Tensor]:
        """This micro-batch's share of the step's totals: Z per depth, valid targets per depth, one micro-batch."""
        targets, weights, _ = self._targets_and_weights(batch)
        Z, n = [], []
        for k, t in enumerate(targets):
            n.append((t != -100).sum())
            j = 0 if self.normalization == "sequence" else k   # sequence: every depth divides by |B| = sum_t w_t
            valid = targets[j] != -100
            if weights is None:
                Z.append(valid.sum())
            else:                                           # the weight of label t+j+1 sits at position t
                w = F.pad(weights[:, j + 1:], (0, min(j + 1, weights.shape[1])))
                Z.append((w * valid).sum())
        return {"Z": torch.stack(Z).double(), "targets": torch.stack(n).double(),
                "micro_batches": torch.ones((), dtype=torch.float64)}

    def __call__(self, model, batch, totals):
        """(loss to backpropagate, metrics already divided by the step's totals (sum them over micro-batches),
        model output)."""
        targets, weights, _ = self._targets_and_weights(batch)
        ids, D = batch["input_ids"], self.mtp_depths
        out = model(ids, batch.get("attention_mask"), position_ids=batch.get("position_ids"), labels=batch["labels"],
                    loss_weights=weights, loss_reduction="sum", mtp_depths=D, return_router=bool(self.aux_coeff))
        ct = out.loss.dtype
        if self.cp_group is not None:           # the targets of this rank's slice of each row
            import torch.distributed as dist
            size = dist.get_world_size(self.cp_group)
            targets = [sequence_slice(t, dist.get_rank(self.cp_group), size) for t in targets]
        local = torch.stack([(t != -100).sum() for t in targets]).to(ids.device, ct)
        Z, n = (totals[k].to(ids.device, ct).clamp(min=1e-12) for k in ("Z", "targets"))
        main = out.loss / Z[0]
        loss = main
        metrics = {"loss": main.detach(), "accuracy": out.accuracy * local[0] / n[0]}
        for k in range(D):
            loss_k = out.mtp_losses[k] / Z[k + 1]
            loss = loss + self.mtp_lambda / D * loss_k
            metrics[f"mtp{k + 1}_loss"] = loss_k.detach()
            metrics[f"mtp{k + 1}_accuracy"] = out.mtp_accuracies[k] * local[k + 1] / n[k + 1]
        if self.aux_coeff:
            rows = ids.shape[0]
            for r in out.router.values():
                loss = loss + sequence_aux_loss(r.scores_TE, rows, r.ids_TK.shape[1], self.aux_coeff,
                                              self.cp_group) / \
                    totals["micro_batches"].to(ids.device, ct)
        metrics["total_loss"] = loss.detach()
        return loss, metrics, out
