"""Scoring a prompt: the model's log-probability of each prompt token given the ones before it (what OpenAI's legacy
`echo` + `logprobs` returns, and what evaluation harnesses sum to rank multiple-choice answers).

    log p(x_i | x_<i) = logits_{i-1}[x_i] - logsumexp(logits_{i-1})        for i = 1 .. L-1; x_0 has none

One forward over the whole prompt, no cache. Leaves out: a prefix cache shared with generation (the prompt is run
again when generation follows) and chunking (a prompt's (L, V) logits are held at once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PromptScores:
    token_logprobs: list[float]
    """log p(x_i | x_<i) for i = 1 .. L-1 (the first token has no context, so none)."""
    top: list[list[tuple[int, float]]]
    """At each of those positions, the `top` most likely (token id, log-probability), most likely first."""


@torch.inference_mode()
def score_prompt(model, ids: list[int], top: int = 0) -> PromptScores:
    """Log-probabilities of ids[1:] under `model` (raw logits: no temperature or penalty), and `top` alternatives."""
    x = torch.tensor(ids, device=model.lm_head.weight.device)[None]         # (1, L)
    logp = torch.log_softmax(model(x).logits[0, :-1].float(), -1)           # (L-1, V)
    lps = logp.gather(-1, x[0, 1:, None])[:, 0].tolist()
    if not top:
        return PromptScores(lps, [[] for _ in lps])
    v, i = logp.topk(top, -1)                                               # (L-1, top)
    return PromptScores(lps, [list(zip(a, b)) for a, b in zip(i.tolist(), v.tolist())])
