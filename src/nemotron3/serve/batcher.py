"""Continuous batching: requests join and leave a running batch between decode steps.

A fixed number of slots share one HybridCache. Attention in Nemotron-H has no positional encoding, so where a
token's K/V sits in the buffer does not matter, only which entries a row may see (the cache's `valid` mask). All
rows therefore write at one shared pointer; a joining request is prefilled alone (batch 1) and its K/V copied to
the positions just before the pointer (the pointer first jumps forward if the prompt is longer than the history,
leaving a gap that no row can see), its Mamba conv/SSM state copied into its slot. A finished or cancelled request
frees its slot at once (its entries become invisible). When the pointer nears the end of the buffer, every row's
visible entries are packed to the front (`compact`). Each step is one Engine round over all slots (plain, or MTP
speculative with exact rollback), so the per-request output equals Engine.generate's for greedy requests.
"""

from __future__ import annotations

import torch

from ..infer.engine import Engine, Request, _Row
from ..infer.sampling import SamplingParams
from ..model.cache import HybridCache


class _Empty:
    """An unused slot: treated as a finished greedy row."""
    done, budget, plain_greedy, tokens = True, None, True, []
    req = Request([0], 1, SamplingParams())
    seen, generator = [0], None

    def seen_tensor(self, extra=()):
        return None


class Batcher(Engine):
    def __init__(self, model, tokenizer, max_batch: int = 8, num_speculative_tokens: int = 0,
                 max_len: int | None = None, prefill_chunk: int = 512):
        super().__init__(model, tokenizer, num_speculative_tokens, prefill_chunk)
        cfg = model.config
        self.context = min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.buf = 2 * self.context + num_speculative_tokens + 2          # room to keep writing before a compaction
        p = model.lm_head.weight
        self.device, self.dtype = p.device, p.dtype
        self.cache = self._new(cfg, max_batch, include_mtp=False)
        self.mtp_cache = self._new(cfg, max_batch, include_mtp=True) if self.K else None
        self.rows: list = [_Empty() for _ in range(max_batch)]
        self.keys: list = [None] * max_batch                              # the caller's handle per slot
        self.last = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.draft_h = torch.zeros(max_batch, 1, cfg.hidden_size, device=self.device, dtype=self.dtype)
        self.compactions = 0

    def _new(self, cfg, b, include_mtp):
        c = HybridCache(cfg, b, self.buf, self.device, self.dtype, include_mtp=include_mtp, include_main=not include_mtp)
        c.valid = torch.zeros(b, self.buf, dtype=torch.bool, device=self.device)
        return c

    # ---- slots -----------------------------------------------------------------------------------------------
    def free_slots(self) -> int:
        return sum(isinstance(r, _Empty) for r in self.rows)

    def active(self) -> int:
        return len(self.rows) - self.free_slots()

    def release(self, slot: int) -> None:
        """Free a slot now (finished or cancelled): its cache entries become invisible."""
        self.rows[slot], self.keys[slot] = _Empty(), None
        for c in (self.cache, self.mtp_cache):
            if c is not None:
                c.valid[slot] = False

    @torch.inference_mode()
    def add(self, request: Request, key=None) -> tuple[int, list]:
        """Prefill `request` alone and place it in a free slot; returns (slot, events of its first token)."""
        self.check([request])
        if len(request.prompt_ids) + request.max_tokens > self.context:
            raise ValueError(f"prompt ({len(request.prompt_ids)} tokens) + max_tokens ({request.max_tokens}) exceeds "
                             f"the server's context of {self.context} tokens; shorten the prompt or lower max_tokens.")
        slot = next(i for i, r in enumerate(self.rows) if isinstance(r, _Empty))
        model, cfg = self.model, self.model.config
        ids = torch.tensor([request.prompt_ids], device=self.device)
        L = ids.shape[1]
        tmp = HybridCache(cfg, 1, L + 1, self.device, self.dtype)
        hs = []
        for s in range(0, L, self.chunk):                   # chunked prefill, as in Engine
            out = model(ids[:, s:s + self.chunk], cache=tmp, logits_to_keep=1)
            hs.append(out.hidden_states)
        row = _Row(request, self.tok, self.device)
        first = self._choose([row], out.logits[:, -1])
        if self.cache.pos + self.K + 2 + L > self.buf:
            self.compact()
        p = max(self.cache.pos, L)                           # jump over a gap no row can see if the prompt is longer
        for c in (self.cache, self.mtp_cache):
            if c is not None:
                c.valid[:, c.pos:p] = False
                c.pos = p
        self._place(tmp, slot, p, L)
        if self.K:
            tmp_mtp = HybridCache(cfg, 1, L + 1, self.device, self.dtype, include_mtp=True, include_main=False)
            next_ids = torch.cat([ids[:, 1:], first[:, None]], 1)
            for c, s in enumerate(range(0, L, self.chunk)):
                h = self._mtp_catch_up(hs[c], next_ids[:, s:s + self.chunk], None, tmp_mtp)
            self.draft_h[slot] = h[0]
            self._place(tmp_mtp, slot, p, L, into=self.mtp_cache)
        self.rows[slot], self.keys[slot] = row, key
        self.last[slot] = first[0]
        return slot, self._emit(slot, row, int(first[0]), out.logits[0, -1])

    def _place(self, src: HybridCache, slot: int, p: int, L: int, into: HybridCache | None = None):
        dst = into or self.cache
        for i, (k, v) in src.kv.items():
            dst.kv[i][0][slot, :, p - L:p] = k[0, :, :L]
            dst.kv[i][1][slot, :, p - L:p] = v[0, :, :L]
        for i in src.ssm:
            dst.conv[i][slot] = src.conv[i][0]
            dst.ssm[i][slot] = src.ssm[i][0]
        dst.valid[slot] = False
        dst.valid[slot, p - L:p] = True

    def compact(self) -> None:
        """Pack every row's visible K/V entries to the front of the buffer, keeping their order."""
        self.compactions += 1
        for c in (self.cache, self.mtp_cache):
            if c is None:
                continue
            counts = c.valid[:, :c.pos].sum(1)
            P = int(counts.max()) if len(counts) else 0
            for r in range(c.batch_size):
                idx = c.valid[r, :c.pos].nonzero().squeeze(1)
                n = len(idx)
                for k, v in c.kv.values():
                    k[r, :, P - n:P] = k[r, :, idx].clone()
                    v[r, :, P - n:P] = v[r, :, idx].clone()
                c.valid[r] = False
                c.valid[r, P - n:P] = True
            c.pos = P

    # ---- one decode step for every slot ----------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list:
        """One round (a token, or up to K+1 with speculation) for every active slot; returns the Events
        (index = slot). Finished rows stay in their slot until release()."""
        if self.cache.pos + self.K + 2 > self.buf:
            self.compact()
        events, self.last, draft_h = self._step(self.rows, self.last, self.draft_h, self.cache, self.mtp_cache)
        if draft_h is not None:
            self.draft_h = draft_h
        return events
