"""Per-request sampling: the distribution a request samples from, after its logits processors.

    logits -> repetition penalty (CTRL: l/θ if l > 0 else l*θ, on every token already in the sequence)
           -> / temperature -> top-k -> top-p (smallest prefix with mass >= p) -> min-p (drop p < min_p * p_max)
           -> softmax = the target distribution p
Greedy is temperature 0 (argmax of the penalised logits). Speculative rejection sampling compares the target's p
and the drafter's q after the *same* processors, so the output distribution equals plain sampling's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    temperature: float = 0.0
    """0 = greedy; > 0 samples."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = off)."""
    top_p: float = 1.0
    """Nucleus: keep the smallest set of tokens whose mass reaches top_p, in (0, 1]."""
    min_p: float = 0.0
    """Drop tokens with probability below min_p * (probability of the most likely token), in [0, 1)."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the sequence (prompt included); 1 = off."""
    seed: int | None = None
    """Seed of this request's own generator: the same request gives the same output."""

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"temperature={self.temperature!r} must be >= 0 (0 = greedy).")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0 (0 = off).")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p!r} must lie in (0, 1].")
        if not (isinstance(self.min_p, (int, float)) and 0 <= self.min_p < 1):
            raise ValueError(f"min_p={self.min_p!r} must lie in [0, 1).")
        if not (isinstance(self.repetition_penalty, (int, float)) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty={self.repetition_penalty!r} must be > 0 (1 = off).")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def penalize(logits: torch.Tensor, seen: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """CTRL repetition penalty on the ids in `seen` (1-D) for logits (..., V)."""
    if penalty == 1.0 or seen is None or seen.numel() == 0:
        return logits
    ids = seen.unique()
    picked = logits[..., ids]
    return logits.index_copy(-1, ids, torch.where(picked > 0, picked / penalty, picked * penalty))


def target_probs(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """logits (..., V) float32 -> the distribution the request samples from (one-hot argmax when greedy)."""
    logits = penalize(logits.float(), seen, params.repetition_penalty)
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if params.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= params.top_p          # keep the smallest prefix reaching top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), 0.0)
    return probs / probs.sum(-1, keepdim=True)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One id per row of probs (..., V)."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def logprobs_of(logits: torch.Tensor, token: int, top: int = 0) -> dict:
    """The model's log-probability of `token` (raw logits, before sampling processors, as OpenAI reports them) and
    the `top` most likely alternatives: {"logprob": float, "top": [(id, logprob), ...]}."""
    lp = torch.log_softmax(logits.float(), -1)
    out = {"logprob": float(lp[token]), "top": []}
    if top:
        v, i = lp.topk(top)
        out["top"] = list(zip(i.tolist(), v.tolist()))
    return out
