"""Sampling: the one place where logits become a distribution and a token, for every row of a batch at once.

    logits -> repetition penalty (CTRL: l/θ if l > 0 else l*θ, on every token already in the sequence)
           -> / temperature -> top-k -> top-p (smallest prefix with mass >= p) -> min-p (drop p < min_p * p_max)
           -> softmax = the target distribution p          (greedy = temperature 0 = one-hot argmax)
Each row has its own parameters (SamplingParams, gathered into tensors by RowParams), so a batch mixes greedy and
sampled requests in the same few tensor ops. Speculative rejection sampling compares the target's p and the
drafter's q after the *same* processors, so the output distribution equals plain sampling's.

Randomness is counter-based (splitmix64 of (seed, draw index)), one stream per request: a row's draws depend on its
own seed and how many rounds it has run, never on which other rows share the batch. So a seeded request gives the
same tokens alone or batched, and no host-side generator object is touched per row. A token is drawn from p by
inverse CDF: the first id whose cumulative mass exceeds u * total.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_SEED = 2 ** 63 - 1


@dataclass
class SamplingParams:
    temperature: float = 0.0
    """0 = greedy; otherwise in [0.01, 100] (smaller values overflow float32 logits: use 0 for greedy)."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = off)."""
    top_p: float = 1.0
    """Nucleus: keep the smallest set of tokens whose mass reaches top_p, in (0, 1]."""
    min_p: float = 0.0
    """Drop tokens with probability below min_p * (probability of the most likely token), in [0, 1)."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the sequence (prompt included); 1 = off; in [0.01, 100]."""
    seed: int | None = None
    """Seed of this request's random stream, in [0, 2**63): the same request gives the same output."""

    def __post_init__(self):
        def number(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x     # not NaN
        if not (number(self.temperature) and (self.temperature == 0 or 0.01 <= self.temperature <= 100)):
            raise ValueError(f"temperature={self.temperature!r} must be 0 (greedy) or lie in [0.01, 100].")
        if not (isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0):
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0 (0 = off).")
        if not (number(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p!r} must lie in (0, 1].")
        if not (number(self.min_p) and 0 <= self.min_p < 1):
            raise ValueError(f"min_p={self.min_p!r} must lie in [0, 1).")
        if not (number(self.repetition_penalty) and 0.01 <= self.repetition_penalty <= 100):
            raise ValueError(f"repetition_penalty={self.repetition_penalty!r} must lie in [0.01, 100] (1 = off).")
        if self.seed is not None and not (isinstance(self.seed, int) and not isinstance(self.seed, bool)
                                          and 0 <= self.seed <= MAX_SEED):
            raise ValueError(f"seed={self.seed!r} must be an integer in [0, 2**63).")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class RowParams:
    """The sampling parameters of a batch's rows as (b,) tensors, plus flags saying which processors any row uses
    (a batch with no top-p row sorts nothing)."""

    def __init__(self, params: list[SamplingParams], device):
        t = lambda vals, dtype=torch.float32: torch.tensor(vals, dtype=dtype, device=device)   # noqa: E731
        self.greedy = t([p.greedy for p in params], torch.bool)
        self.temperature = t([p.temperature if not p.greedy else 1.0 for p in params])
        self.top_k = t([p.top_k for p in params], torch.long)
        self.top_p = t([p.top_p for p in params])
        self.min_p = t([p.min_p for p in params])
        self.penalty = t([p.repetition_penalty for p in params])
        self.all_greedy = all(p.greedy for p in params)
        self.any_top_k = any(p.top_k for p in params)
        self.any_top_p = any(p.top_p < 1 for p in params)
        self.any_min_p = any(p.min_p > 0 for p in params)
        self.any_penalty = any(p.repetition_penalty != 1.0 for p in params)


def _b(x):
    return x[:, None, None]                                                    # (b,) -> (b, 1, 1)


def target_probs_rows(logits: torch.Tensor, rp: RowParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """logits (b, L, V) -> the distribution each row samples from at each position (b, L, V) float32; seen (b, L, V)
    bool marks tokens already in the sequence (repetition penalty), or None."""
    logits = logits.float()
    if rp.any_penalty and seen is not None:
        theta = _b(rp.penalty)
        logits = torch.where(seen, torch.where(logits > 0, logits / theta, logits * theta), logits)
    greedy_choice = logits.argmax(-1)                                          # (b, L)
    if rp.all_greedy:
        return torch.nn.functional.one_hot(greedy_choice, logits.shape[-1]).float()
    logits = logits / _b(rp.temperature)
    V = logits.shape[-1]
    if rp.any_top_k:
        k = torch.where(rp.top_k > 0, rp.top_k.clamp(max=V), V)               # (b,)
        kth = logits.sort(-1, descending=True).values.gather(-1, _b(k - 1).expand(*logits.shape[:2], 1))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if rp.any_top_p:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= _b(rp.top_p)                  # keep the smallest prefix reaching top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    if rp.any_min_p:
        probs = probs.masked_fill(probs < _b(rp.min_p) * probs.amax(-1, keepdim=True), 0.0)
    probs = probs / probs.sum(-1, keepdim=True)
    onehot = torch.nn.functional.one_hot(greedy_choice, V).float()
    return torch.where(_b(rp.greedy), onehot, probs)


def target_probs(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """One request's distribution: logits (V,) or (L, V), seen a 1-D tensor of ids already in the sequence."""
    lead = logits.shape[:-1]
    flat = logits.reshape(1, -1, logits.shape[-1])
    mask = None
    if seen is not None and seen.numel():
        mask = torch.zeros(flat.shape[-1], dtype=torch.bool, device=logits.device)
        mask[seen] = True
        mask = mask.expand_as(flat)
    return target_probs_rows(flat, RowParams([params], logits.device), mask).reshape(*lead, -1)


# ---- counter-based random numbers (splitmix64 in int64 arithmetic, which wraps like uint64) ----------------------
_GOLDEN, _M1, _M2 = -7046029254386353131, -4658895280553007687, -7723592293110705685   # 0x9E37.., 0xBF58.., 0x94D0..


def _lshr(x: torch.Tensor, s: int) -> torch.Tensor:
    return (x >> s) & ((1 << (64 - s)) - 1)                                    # logical shift of int64


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    z = x + _GOLDEN
    z = (z ^ _lshr(z, 30)) * _M1
    z = (z ^ _lshr(z, 27)) * _M2
    return z ^ _lshr(z, 31)


def uniforms(stream: torch.Tensor, counter: torch.Tensor, n: int) -> torch.Tensor:
    """(b, n) float64 in [0, 1): draws counter .. counter + n - 1 of each row's stream (stream = splitmix64(seed))."""
    idx = counter[:, None] + torch.arange(n, device=counter.device)
    return _lshr(splitmix64(stream[:, None] ^ splitmix64(idx)), 11).double() * 2.0 ** -53


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sample: probs (..., V) (unnormalised is fine), u (...) in [0, 1) -> ids (...)."""
    cdf = probs.double().cumsum(-1)
    x = (u * cdf[..., -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, x, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def token_logprobs(logits: torch.Tensor, probs: torch.Tensor, tokens: torch.Tensor, top: int = 0):
    """Per position: the raw model's log-probability of `tokens` (b, L) (what OpenAI reports), the log-probability
    under the distribution actually sampled (what RL's importance weights need), and the `top` most likely raw
    alternatives ((b, L, top) ids and log-probabilities, or None)."""
    raw = torch.log_softmax(logits.float(), -1)
    lp_raw = raw.gather(-1, tokens[..., None]).squeeze(-1)
    lp_sampled = probs.gather(-1, tokens[..., None]).squeeze(-1).log()
    alts = raw.topk(top, -1) if top else None
    return lp_raw, lp_sampled, alts
