"""Speculative decoding's accept rule for a whole batch in a few tensor ops (Leviathan et al. 2023; gpt-fast's
loop without the per-position Python): every row accepts its own number of drafts.

Given, per row, K drafts d_1..d_K drawn from the drafter's distributions q_1..q_K and the target's distributions
p_0..p_K from one verify pass over [t0, d_1..d_K] (p_j is the target after d_j; both after the same sampling
processors):
    accept d_j  iff  u_j * q_j(d_j) < p_{j-1}(d_j)          (probability min(1, p/q); u_j uniform in [0, 1))
    n = the number of leading accepted drafts
    then one more token from  norm(max(p_n - q_{n+1}, 0))   if n < K (the residual; p_n itself if that is empty)
                        or    p_K                           if n = K  (the bonus token)
The emitted tokens d_1..d_n, c are distributed exactly as n + 1 tokens sampled from p one by one. Greedy rows pass
one-hot p and q (argmax), which makes the same rule "accept while the draft equals the target's argmax, then emit
the target's argmax". Forced tokens (a reasoning budget closing the thought) are one-hot p rows too.

When every row is greedy, greedy_round runs a whole round (drafts, verify, accept, cache rollback, MTP catch-up)
as tensor ops only, so the engine compiles it as one graph: on CPU a round's cost at batch 1 is mostly per-call
overhead, and three compiled calls with Python between them cost ~1.2x one (measured on `small`: 978 vs ~800
tok/s).

Draft vocabulary (FR-Spec, Zhao et al. 2025, arXiv 2502.14856): the drafter may score only the N most frequent
tokens (frequent_tokens; the LM head's rows of those ids, gathered once). Its q is then 0 outside them, which the
rule above already handles (such a token is never drafted; the residual max(p - q, 0) keeps its whole p), so the
output is unchanged: greedy exactly, sampling in distribution. Only the share of accepted drafts can drop.
"""

from __future__ import annotations

import numpy as np
import torch

from ..model.cache import select_mamba_states
from .sampling import draw

# Default size of a draft vocabulary: a quarter of the vocabulary (FR-Spec drafts over 32k of Llama-3's 128k).
DRAFT_VOCAB_SHARE = 0.25
# Below this vocabulary size no draft vocabulary is made: the LM head is too small a part of a draft step to
# gain (measured in bench/decode_speed.py: the byte-vocabulary demo model, V=256, gains nothing).
MIN_DRAFT_VOCAB_SOURCE = 1024
# Tokens counted for frequent_tokens (a corpus prefix; counts of the most frequent ids settle long before).
MAX_COUNTED_TOKENS = 50_000_000
_COUNT_CHUNK = 1 << 22          # tokens counted at a time (an int64 copy of 32 MiB, not of the whole prefix)


def frequent_tokens(token_ids, vocab_size: int, n: int | None = None) -> torch.Tensor | None:
    """The draft vocabulary of a corpus: its n most frequent token ids (LongTensor, most frequent first; ids never
    seen are left out), from token_ids (a 1-D tensor or array of a training corpus's ids; its first
    MAX_COUNTED_TOKENS are counted). n defaults to DRAFT_VOCAB_SHARE of vocab_size. Returns None where drafting
    over it would not pay: a vocabulary under MIN_DRAFT_VOCAB_SOURCE, or a result over half the vocabulary."""
    if vocab_size < MIN_DRAFT_VOCAB_SOURCE:
        return None
    n = int(vocab_size * DRAFT_VOCAB_SHARE) if n is None else n
    if n < 1:
        raise ValueError(f"a draft vocabulary needs n >= 1 tokens, got {n}.")
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for start in range(0, min(len(token_ids), MAX_COUNTED_TOKENS), _COUNT_CHUNK):     # a memmap is read in place
        end = min(start + _COUNT_CHUNK, MAX_COUNTED_TOKENS)
        chunk = token_ids[start:end]
        ids = (chunk.cpu().long() if isinstance(chunk, torch.Tensor)
               else torch.from_numpy(np.array(chunk, dtype=np.int64))).reshape(-1)       # numpy: a writable copy
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(f"token ids must lie in [0, {vocab_size}) (vocab_size); got [{int(ids.min())}, "
                             f"{int(ids.max())}].")
        counts += torch.bincount(ids, minlength=vocab_size)
    order = counts.argsort(descending=True, stable=True)[:n]
    order = order[counts[order] > 0]
    return order if 0 < len(order) <= vocab_size // 2 else None


def accept_drafts(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, u_accept: torch.Tensor,
                  u_final: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """p (b, K+1, V), q (b, K, V), drafts (b, K), u_accept (b, K), u_final (b,) -> (emitted (b, K+1): the accepted
    drafts then the correction or bonus token at index n, anything after it; n (b,) accepted drafts per row)."""
    b, K = drafts.shape
    p_d = p[:, :K].gather(-1, drafts[..., None]).squeeze(-1)                   # (b, K)  p_{j-1}(d_j)
    q_d = q.gather(-1, drafts[..., None]).squeeze(-1)                          # (b, K)  q_j(d_j) > 0: d_j ~ q_j
    ok = (u_accept * q_d < p_d).long()
    n = ok.cumprod(-1).sum(-1)                                                 # (b,)   leading accepted drafts
    idx = n[:, None, None].expand(b, 1, p.shape[-1])
    p_n = p.gather(1, idx).squeeze(1)                                          # (b, V)
    q_n = torch.cat([q, torch.zeros_like(q[:, :1])], 1).gather(1, idx).squeeze(1)   # q_{n+1}; 0 for the bonus
    resid = (p_n - q_n).clamp(min=0)
    resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, p_n)
    final = draw(resid, u_final)                                               # (b,)
    emitted = torch.cat([drafts, drafts[:, :1]], 1).scatter(1, n[:, None], final[:, None])
    return emitted, n


def greedy_round(model, last: torch.Tensor, draft_h: torch.Tensor, main_pos: torch.Tensor, mtp_pos: torch.Tensor,
                 main_states: list, mtp_states: dict, K: int, head: torch.Tensor | None = None,
                 vocab: torch.Tensor | None = None):
    """One greedy speculative round in tensor ops only, so the engine compiles it as one graph (one call per round
    instead of three, no Python between the steps):
        drafts d_1..d_K = model.mtp_draft_step(draft_h)            (argmax drafts, MTP cache left as it was)
        verify [last, d_1..d_K] in one decode_step                 (logits and Mamba states after every token)
        n = leading drafts equal to the verifier's argmax;  emitted = the argmax row (d_1..d_n, then the correction
            or bonus token at index n)
        main cache: Mamba states after token n, pos = start + n + 1 (K/V past it are never read)
        MTP cache: depth 1 over [emitted] teacher-forced, kept to the same n + 1 positions; its output at n is the
            next round's draft_h.
    last (b,): each row's last emitted token; draft_h (b, 1, d): MTP depth 1's output there; main_pos / mtp_pos (b,)
    the caches' positions (updated in place); main_states: HybridCache.layer_state per main layer; mtp_states:
    {layer index: layer_state} of the MTP layers. The caller checks that K + 1 more tokens fit (HybridCache.reserve).
    Returns (emitted (b, K+1), n (b,), verify logits (b, K+1, V) float32, next draft_h (b, 1, d))."""
    compiled = torch.compiler.is_compiling()
    drafts = model.mtp_draft_step(draft_h, mtp_pos, mtp_states, K, head, vocab, compiled=compiled)
    start = main_pos.clone()
    logits, h, mamba = model.decode_step(torch.cat([last[:, None], drafts], 1), main_pos, main_states,
                                         keep_mamba_states=True)
    emitted = logits.argmax(-1)                                                          # (b, K+1)
    n = (drafts == emitted[:, :K]).long().cumprod(-1).sum(-1)                            # (b,)
    select_mamba_states(dict(enumerate(main_states)), mamba, n)
    main_pos.copy_(start + n + 1)
    start_mtp = mtp_pos.clone()
    h_mtp, mtp_mamba = model.mtp_decode_step(1, h, emitted, mtp_pos, mtp_states, keep_mamba_states=True)  # {} if none
    select_mamba_states(mtp_states, mtp_mamba, n)
    mtp_pos.copy_(start_mtp + n + 1)
    rows = torch.arange(last.shape[0], device=last.device)
    return emitted, n, logits, h_mtp[rows, n][:, None]
