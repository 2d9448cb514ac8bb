"""The inference engine: requests join and leave a running batch at any step (vLLM's add_request / step / abort),
prompts are prefilled in chunks between decode steps, and every live row decodes one round per step, plainly or
with MTP self-speculative decoding; stop tokens and strings, logprobs, budgets, forking a prompt into n samples.

    engine = Engine(model, tokenizer, num_speculative_tokens=3)
    rid = engine.add_request(Request(prompt_ids, max_tokens=64))
    while engine.has_unfinished():
        for ev in engine.step():                    # Event(request_id, sample, token_id, text, result=None|Result)
            print(ev.text, end="")
    engine.generate([Request(...), ...])            # the same loop, results in request order

Layout: one HybridCache of max_batch + 1 rows, each row its own sequence at its own position. Rows [0, n) decode;
the last row is the prefill scratch row. A prompt is prefilled there chunk by chunk (one chunk per step, so a long
prompt does not stall the running streams), then its state is copied into n free decode rows (prefix forking:
one prefill, n samples). A finished row is replaced by the last live row (one row's state copied), so the decode
batch is always the contiguous rows [0, n) and a step runs on exactly the live rows.

Speculative round (MTP heads as the drafter), each row accepting its own number of drafts:
    1. draft: MTP depth 1 on (hidden of the last verified position, the token just chosen), then the head again on
       (its own output, the draft) for depths 2..K (temporary MTP cache entries, dropped afterwards)
    2. verify: one forward of the main model over [t0, d1..dK]; Mamba layers return their state after each token
       (mamba2.ssd_states)
    3. accept: speculative.accept_drafts for the whole batch (exact rejection sampling; greedy = argmax match)
    4. roll back: each row keeps the Mamba state after its t0, d1..dn and moves its position to start + n + 1
    5. catch the MTP cache up on the kept positions (teacher-forced, as in training); its last output drafts next.
When every row is greedy, steps 1-5 are one function of tensors (speculative.greedy_round), one compiled call.
Speculation is used only where it pays: `num_speculative_tokens` may be a dict {max batch size: K} (e.g.
{1: 3, 4: 2, 8: 0}); the K of the smallest key >= the batch about to run (live rows plus queued requests)
applies, 0 = plain decoding.
Draft vocabulary (FR-Spec): the drafter scores only `draft_vocab`'s tokens (the LM head's rows of them, gathered
once), which makes a draft step cheaper where the LM head is a large part of it; verification scores the whole
vocabulary, so the output is unchanged (speculative.py). By default ("auto") the engine takes the checkpoint's
(`model.draft_vocab`: the most frequent tokens of the training data, saved by training as draft_vocab.json; none
for vocabularies under 1024 tokens, e.g. the byte tokenizer's, where it does not pay); None drafts over all tokens.
"""

from __future__ import annotations

import functools
import itertools
from collections import deque

import torch

from ..checkpoint import draft_vocab_problem
from .budget import ReasoningBudget
from .reasoning import THINK_CLOSE
from .request import Event, IdsOnly, Request, Result, SequenceState
from .sampling import RowParams, draw, splitmix64, target_probs_rows, token_logprobs, uniforms
from .speculative import accept_drafts, greedy_round

# Draft tokens per round by batch size (live rows plus queued requests: Engine._batch_ahead), the default of the
# CLI and the server: measured in bench/decode_speed.py (2 CPU threads, demo and small models); speculation stops
# paying as the batch grows.
SPECULATION_BY_BATCH = {2: 2, 4: 1, 1024: 0}


class _Prefill:
    """A prompt being prefilled in the scratch row, one chunk per step."""

    def __init__(self, rid: int, req: Request, seqs: list[SequenceState], ids: torch.Tensor):
        self.rid, self.req, self.seqs, self.ids, self.done = rid, req, seqs, ids, 0
        self.prev_h: torch.Tensor | None = None       # the previous chunk's hidden states (MTP catch-up)
        self.mtp_prompt = True                        # run the MTP head over the prompt (Engine._prefill_chunk)


class Engine:
    def __init__(self, model, tokenizer=None, num_speculative_tokens: int | dict = 0, prefill_chunk: int = 512,
                 max_batch: int = 32, max_model_len: int | None = None, draft_vocab="auto"):
        spec = (num_speculative_tokens if isinstance(num_speculative_tokens, dict)
                else {max_batch: num_speculative_tokens})
        if any(not isinstance(k, int) or k < 0 for k in spec.values()) or any(b < 1 for b in spec):
            raise ValueError(f"num_speculative_tokens={num_speculative_tokens!r} must be an integer >= 0 (0 = plain "
                             f"decoding) or a dict {{max batch size >= 1: K >= 0}}.")
        if max(spec.values()) and model.mtp is None:
            raise ValueError("num_speculative_tokens > 0 needs MTP heads; this model has none "
                             "(num_nextn_predict_layers=0). Use 0 for plain decoding.")
        if not isinstance(max_batch, int) or max_batch < 1 or prefill_chunk < 1:
            raise ValueError(f"max_batch={max_batch!r} and prefill_chunk={prefill_chunk!r} must be positive integers.")
        self.model, self.tok, self.chunk, self.max_batch = model, tokenizer or IdsOnly(), prefill_chunk, max_batch
        self.draft_vocab = self._check_draft_vocab(model, draft_vocab)
        self.spec_by_batch = sorted(spec.items())
        self.K_max = max(spec.values())
        self.max_model_len = max_model_len or model.config.max_position_embeddings
        p = model.lm_head.weight
        self.device, self.dtype = p.device, p.dtype
        self.version = 0
        self.cache = self.mtp_cache = None
        self.rows: list[SequenceState] = []               # decode row i holds rows[i]
        self.waiting: deque[_Prefill] = deque()
        self.prefilling: _Prefill | None = None
        self._ids = itertools.count()
        self._finished: list[Event] = []
        self._compiled_round = None                       # (model.decode_compilation, the greedy round it runs)
        self._params_dirty = True
        self.reset_stats()

    @staticmethod
    def _check_draft_vocab(model, draft_vocab) -> torch.Tensor | None:
        if isinstance(draft_vocab, str) and draft_vocab == "auto":
            draft_vocab = getattr(model, "draft_vocab", None)
        if draft_vocab is None:
            return None
        V = model.config.vocab_size
        if problem := draft_vocab_problem(draft_vocab, V):
            raise ValueError(f"draft_vocab must be None, 'auto' or a 1-D tensor: {problem} (e.g. "
                             f"infer.speculative.frequent_tokens(corpus_ids, {V})).")
        return draft_vocab.long().to(model.lm_head.weight.device)

    # ---- public API -----------------------------------------------------------------------------------------------
    def reset_stats(self):
        self.stats = {"rounds": 0, "drafted": [0] * self.K_max, "accepted": [0] * self.K_max, "tokens": 0}

    def acceptance(self) -> list[float]:
        """Share of drafts accepted at each draft position 1..K (over live rows of every speculative round)."""
        return [a / d if d else 0.0 for a, d in zip(self.stats["accepted"], self.stats["drafted"])]

    def K_for(self, batch: int) -> int:
        """Draft tokens per round at this batch size (the engine asks with _batch_ahead: live rows plus queued)."""
        return next((k for b, k in self.spec_by_batch if batch <= b), self.spec_by_batch[-1][1])

    def check(self, request: Request) -> None:
        """Raise ValueError naming the problem for a request the engine cannot run."""
        if not isinstance(request, Request):
            raise ValueError(f"expected a Request, got {type(request).__name__}.")
        ids = request.prompt_ids
        if not ids:
            raise ValueError("empty prompt: give at least one token.")
        if not isinstance(request.max_tokens, int) or isinstance(request.max_tokens, bool) or request.max_tokens < 1:
            raise ValueError(f"max_tokens={request.max_tokens!r} must be a positive integer.")
        if not isinstance(request.n, int) or not 1 <= request.n <= self.max_batch:
            raise ValueError(f"n={request.n!r} must be an integer in [1, {self.max_batch}] (the engine's max_batch).")
        if len(ids) + request.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({request.max_tokens}) exceeds the model's "
                             f"context of {self.max_model_len} tokens (max_position_embeddings, or the engine's "
                             f"max_model_len); shorten the prompt, ask for fewer tokens, or raise the limit "
                             f"(max_model_len= / --max-len: no positional encoding, so longer contexts run).")
        V = self.model.config.vocab_size
        if not all(isinstance(t, int) and 0 <= t < V for t in ids):
            raise ValueError(f"prompt ids must be integers in [0, {V}) (vocab_size is {V}); tokenize with this "
                             f"model's tokenizer.")
        if request.reasoning_budget is not None and not request.thinking:
            raise ValueError("reasoning_budget needs a prompt that opens a thought (thinking=True / "
                             "enable_thinking in the chat template).")

    def add_request(self, request: Request) -> int:
        """Queue a request; returns its id. It is prefilled in the coming steps and then decodes with the batch."""
        self.check(request)
        budget = None
        if request.reasoning_budget is not None:
            budget = ReasoningBudget(request.reasoning_budget, self.tok.encode(request.thought_close), THINK_CLOSE,
                                     self.tok.decode, grace=request.budget_grace)
        rid = next(self._ids)
        seqs = [SequenceState(rid, i, request, self.tok, budget) for i in range(request.n)]
        self.waiting.append(_Prefill(rid, request, seqs, torch.tensor(request.prompt_ids, device=self.device)))
        return rid

    @torch.inference_mode()
    def abort(self, request_id: int) -> list[Result]:
        """Stop a request now (queued, prefilling or decoding); returns its results so far (finish_reason abort)."""
        out = [s for p in self.waiting if p.rid == request_id for s in p.seqs]
        self.waiting = deque(p for p in self.waiting if p.rid != request_id)
        if self.prefilling is not None and self.prefilling.rid == request_id:
            out += self.prefilling.seqs
            self.prefilling = None
        for i in reversed(range(len(self.rows))):
            if self.rows[i].rid == request_id:
                out.append(self.rows[i])
                self._remove_row(i)
        for s in out:
            s.finish = s.finish or "abort"
        return [s.result() for s in sorted(out, key=lambda s: s.sample)]

    def has_unfinished(self) -> bool:
        return bool(self.rows or self.waiting or self.prefilling or self._finished)

    def num_running(self) -> int:
        return len(self.rows)

    def num_waiting(self) -> int:
        return len(self.waiting) + (self.prefilling is not None)

    @torch.inference_mode()
    def update_weights(self, named_tensors, version: int | None = None) -> None:
        """Load new weights (parameters or buffers such as the routers' e_score_correction_bias) between steps
        without rebuilding anything (RL's policy update); tokens generated from now on record `version` (default:
        the previous one + 1)."""
        params = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        for name, t in named_tensors:
            if name not in params:
                raise ValueError(f"update_weights: the model has no parameter or buffer {name!r}.")
            if params[name].shape != t.shape:
                raise ValueError(f"update_weights: {name} has shape {tuple(params[name].shape)}, got {tuple(t.shape)}.")
            params[name].copy_(t)
        if self.K_max and self.draft_vocab is not None and named_tensors:    # the drafter's LM-head rows, again
            self.model.draft_head(self.draft_vocab, refresh=True)
        self.version = self.version + 1 if version is None else version

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """One scheduling step: admit a prompt / prefill one chunk, then one decode round for every live row."""
        events, self._finished = self._finished, []
        self._prefill_chunk(events)
        if self.rows:
            self._decode_round(events)
        return events

    def stream(self, requests: list[Request]):
        """Events of these requests as they are made (request_id = the position in `requests`); drives the engine
        itself, so it needs an engine with nothing else queued (use add_request / step to mix)."""
        if self.has_unfinished():
            raise ValueError("this engine is already running other requests; use add_request / step, or another "
                             "Engine, to run more.")
        for r in requests:
            self.check(r)
        ids = [self.add_request(r) for r in requests]
        first = ids[0] if ids else 0
        done: dict[tuple[int, int], Result] = {}
        while self.has_unfinished():
            for ev in self.step():
                if ev.request_id in ids:
                    ev.request_id -= first
                    if ev.result is not None:
                        ev.result.request_id -= first
                        done[ev.request_id, ev.sample] = ev.result
                    yield ev
        self.last_results = [done[k] for k in sorted(done)]

    def generate(self, requests: list[Request]) -> list[Result]:
        """Run these requests to completion; one Result per (request, sample), in order."""
        if not requests:
            raise ValueError("no requests.")
        for _ in self.stream(requests):
            pass
        return self.last_results

    # ---- the cache and per-row tensors ------------------------------------------------------------------------------
    def _ensure_cache(self, length: int) -> None:
        """Allocate (or grow, keeping every row) the caches so `length` tokens fit per row; power-of-two lengths so
        that a compiled step is reused, not recompiled, across requests."""
        if self.cache is not None and length <= self.cache.max_len:
            return
        new_len = min(max(256, 1 << (length - 1).bit_length()), max(length, self.max_model_len + self.K_max + 1))
        old = (self.cache, self.mtp_cache)
        self.cache = self.model.new_cache(self.max_batch + 1, new_len)
        if self.K_max:
            self.mtp_cache = self.model.new_cache(self.max_batch + 1, new_len, include_mtp=True, include_main=False)
        for o, c in zip(old, (self.cache, self.mtp_cache)):
            if o is not None and c is not None:
                c.pos.copy_(o.pos)
                for i, (k, v) in o.kv.items():
                    c.kv[i][0][:, :, :o.max_len] = k
                    c.kv[i][1][:, :, :o.max_len] = v
                for i in o.ssm:
                    c.conv[i].copy_(o.conv[i])
                    c.ssm[i].copy_(o.ssm[i])

    def _row_tensors(self):
        """Rebuild the per-row tensors after rows joined or left."""
        if not self._params_dirty:
            return
        self.params = RowParams([s.req.sampling for s in self.rows], self.device)
        # every row greedy, no penalty, no budget: the target is the argmax, no distribution is built (the one-hot
        # rule of speculative.py reduces to "accept while the draft equals the argmax")
        self.plain_greedy = self.params.all_greedy and not self.params.any_penalty and not any(
            s.budget or s.grammar for s in self.rows)
        self._params_dirty = False

    def _place(self, seqs: list[SequenceState], first: torch.Tensor, h_last: torch.Tensor, rng_key: torch.Tensor,
               seen: torch.Tensor | None):
        """Fork the scratch row into len(seqs) new decode rows."""
        a, scratch = len(self.rows), self.max_batch
        n = len(seqs)
        for c in (self.cache, self.mtp_cache):
            if c is not None:
                c.copy_row(scratch, range(a, a + n))
        self.rows += seqs
        self.last = first if a == 0 else torch.cat([self.last[:a], first])
        self.rng_key = rng_key if a == 0 else torch.cat([self.rng_key[:a], rng_key])
        self.counter = torch.ones(n, dtype=torch.long, device=self.device) if a == 0 else torch.cat(
            [self.counter[:a], torch.ones(n, dtype=torch.long, device=self.device)])
        if seen is not None or (a and self.seen is not None):
            V = self.model.config.vocab_size
            old = (self.seen[:a] if a and self.seen is not None
                   else torch.zeros(a, V, dtype=torch.bool, device=self.device))
            new = seen if seen is not None else torch.zeros(n, V, dtype=torch.bool, device=self.device)
            self.seen = torch.cat([old, new])
        elif a == 0:
            self.seen = None
        if self.K_max:
            h, _ = self.model.mtp_step(1, h_last.expand(n, 1, -1), first[:, None], self.mtp_cache.rows(a, a + n))
            self.draft_h = h if a == 0 else torch.cat([self.draft_h[:a], h])
        self._params_dirty = True

    def _remove_row(self, i: int) -> None:
        """Free decode row i: the last live row moves into it, so live rows stay contiguous."""
        last = len(self.rows) - 1
        if i != last:
            for c in (self.cache, self.mtp_cache):
                if c is not None:
                    c.copy_row(last, [i])
            self.rows[i] = self.rows[last]
            for name in ("last", "rng_key", "counter", "seen", "draft_h"):
                t = getattr(self, name, None)
                if t is not None:
                    t[i] = t[last]
        self.rows.pop()
        for name in ("last", "rng_key", "counter", "seen", "draft_h"):
            t = getattr(self, name, None)
            if t is not None:
                setattr(self, name, t[:last])
        for c in (self.cache, self.mtp_cache):
            if c is not None:
                c.reset_rows(last, last + 1)
        self._params_dirty = True

    # ---- prefill ------------------------------------------------------------------------------------------------
    def _prefill_chunk(self, events: list[Event]) -> None:
        if self.prefilling is None:
            if not self.waiting or len(self.rows) + self.waiting[0].req.n > self.max_batch:
                return
            self.prefilling = self.waiting.popleft()
            req = self.prefilling.req
            # the MTP head's pass over the prompt pays only if the row will speculate: not when it joins, with the
            # requests queued behind it, a batch too large to. Skipped, drafts for this row are poor until its MTP
            # cache fills, never wrong.
            self.prefilling.mtp_prompt = self.K_for(self._batch_ahead()) > 0
            self._ensure_cache(len(req.prompt_ids) + req.max_tokens + self.K_max + 1)
        pf, model, scratch = self.prefilling, self.model, self.max_batch
        main = self.cache.rows(scratch, scratch + 1)
        L, s = len(pf.ids), pf.done
        chunk = pf.ids[s:s + self.chunk][None]
        out = model(chunk, cache=main, logits_to_keep=1, return_router=pf.req.return_routed_experts)
        if pf.req.return_routed_experts:
            pf.seqs[0].routing.append(self._routing(out)[0].cpu())
        pf.done = s + chunk.shape[1]
        mtp = self.mtp_cache.rows(scratch, scratch + 1) if self.K_max else None
        if mtp is not None:
            if pf.prev_h is not None and pf.mtp_prompt:   # the previous chunk: its next tokens are now all known
                model.mtp_step(1, pf.prev_h, pf.ids[s - pf.prev_h.shape[1] + 1:s + 1][None], mtp)
            pf.prev_h = out.hidden_states
        if pf.done < L:
            return
        # the prompt is in: choose each sample's first token, fork into decode rows, catch the MTP cache up
        self.prefilling = None
        n = len(pf.seqs)
        seed = pf.req.sampling.seed if pf.req.sampling.seed is not None else int(torch.randint(2 ** 62, ()))
        rng_key = splitmix64(torch.full((n,), seed, dtype=torch.long, device=self.device)
                            ^ splitmix64(torch.arange(n, device=self.device)))
        seen = None
        if pf.req.sampling.repetition_penalty != 1.0:
            seen = torch.zeros(n, model.config.vocab_size, dtype=torch.bool, device=self.device)
            seen[:, pf.ids] = True
        logits = out.logits[:, -1:].expand(n, 1, -1)
        rp = RowParams([pf.req.sampling] * n, self.device)
        forced = [s.budget.forced(s.budget_state) if s.budget else None for s in pf.seqs]
        masks = self._grammar_masks(pf.seqs, [[[]] for _ in pf.seqs])
        p = self._target(logits, rp, None if seen is None else seen[:, None], [[f] for f in forced], masks)
        first = draw(p[:, 0], uniforms(rng_key, torch.zeros(n, dtype=torch.long, device=self.device), 1)[:, 0])
        if mtp is not None and pf.mtp_prompt and pf.prev_h.shape[1] > 1:
            tail = pf.prev_h[:, :-1]
            model.mtp_step(1, tail, pf.ids[L - tail.shape[1]:][None], mtp)
        h_last = pf.prev_h[:, -1:] if mtp is not None else None
        for seq in pf.seqs[1:]:
            seq.routing = list(pf.seqs[0].routing)
        self._place(pf.seqs, first, h_last, rng_key, seen)
        for c in (self.cache, self.mtp_cache):
            if c is not None:
                c.reset_rows(scratch, scratch + 1)
        a = len(self.rows) - n
        self._emit(events, list(range(a, a + n)), first[:, None], torch.zeros(n, dtype=torch.long, device=self.device),
                   logits, p)

    # ---- decode -------------------------------------------------------------------------------------------------
    def _target(self, logits, rp, seen, forced, masks=None):
        """Target distributions (b, L, V) with budget-forced tokens as one-hot rows; forced: per row, per position,
        a token id or None (or None for the whole row); masks: (b, L, V) bool of grammar-allowed tokens, or None."""
        if masks is not None:
            logits = logits.masked_fill(~masks, float("-inf"))
        p = target_probs_rows(logits, rp, seen)
        if any(f is not None for row in forced if row for f in row):
            L = logits.shape[1]
            ids = torch.tensor([[(row[j] if row and j < len(row) and row[j] is not None else -1) for j in range(L)]
                                for row in forced], device=p.device)
            one = torch.nn.functional.one_hot(ids.clamp(min=0), p.shape[-1]).float()
            p = torch.where((ids >= 0)[..., None], one, p)
        return p

    def _batch_ahead(self) -> int:
        """The batch the running rows are about to be: live rows plus the rows of requests being prefilled or
        queued. Speculation follows it, not the live count alone, so requests that arrive together do not
        speculate (and run the MTP head over their prompts) while they join one by one into a batch too large to
        speculate (measured: 8 requests at once on `small`, 0.80x plain without this rule)."""
        queued = sum(w.req.n for w in self.waiting) + (self.prefilling.req.n if self.prefilling else 0)
        return len(self.rows) + queued

    def _decode_round(self, events: list[Event]) -> None:
        self._row_tensors()
        b = len(self.rows)
        K = self.K_for(self._batch_ahead())
        view = self.cache.rows(0, b)
        if K == 0:      # the MTP cache is not kept up in plain rounds: if speculation resumes, the first round's
            out = self.model(self.last[:, None], cache=view, logits_to_keep=1,   # drafts are poor, never wrong
                             return_router=self._want_routing())
            self._record_routing(out, torch.zeros(b, dtype=torch.long, device=self.device))
            if self.plain_greedy:
                p, tok = None, out.logits.argmax(-1)
            else:
                seen = None if self.seen is None else self.seen[:, None]
                forced = [[s.budget.forced(s.budget_state)] if s.budget else None for s in self.rows]
                p = self._target(out.logits, self.params, seen, forced, self._grammar_masks(self.rows, [[[]]] * b))
                tok = draw(p[:, 0], uniforms(self.rng_key, self.counter, 1)[:, 0])[:, None]
            self.counter += 1
            self.last = tok[:, 0]
            self._emit(events, list(range(b)), tok, torch.zeros(b, dtype=torch.long, device=self.device),
                       out.logits, p)
            return
        self._speculative_round(events, b, K)

    def _speculative_round(self, events, b: int, K: int) -> None:
        model = self.model
        main, mtp = self.cache.rows(0, b), self.mtp_cache.rows(0, b)
        if self.plain_greedy and not self._want_routing():
            self._greedy_round(events, main, mtp, K)
            return
        u = uniforms(self.rng_key, self.counter, 2 * K + 1)                     # (b, 2K+1): drafts, accepts, final
        self.counter += 2 * K + 1
        # 1. draft K tokens (the MTP cache keeps its state and positions)
        start_mtp = mtp.pos.clone()
        ahead = [[] for _ in range(b)] if any(s.grammar is not None for s in self.rows) else None
        if self.plain_greedy:                  # argmax drafts: all K in one (compiled) call, no distributions
            drafts, qs, seens, seen = model.mtp_draft(self.draft_h, mtp, K, self.draft_vocab), None, None, None
        else:
            drafts, qs, seens, seen = self._draft_sampled(mtp, K, u, ahead)
        # 2. verify [t0, d1..dK] in one forward, keeping the Mamba states after each token
        start = main.pos.clone()
        out = model(torch.cat([self.last[:, None], drafts], 1), cache=main, keep_mamba_states=True,
                    return_router=self._want_routing())
        # 3. accept: each row its own count
        if self.plain_greedy:         # accept while the draft is the argmax; then the argmax: the argmax row itself
            p, emitted = None, out.logits.argmax(-1)                           # (b, K+1)
            n = (drafts == emitted[:, :K]).long().cumprod(-1).sum(-1)
        else:
            forced = self._forced_ahead(drafts, K)
            masks = None if ahead is None else self._grammar_masks(self.rows, [[a[:j] for j in range(K + 1)]
                                                                               for a in ahead])
            p = self._target(out.logits, self.params, None if seen is None else torch.cat(seens, 1), forced, masks)
            emitted, n = accept_drafts(p, torch.stack(qs, 1), drafts, u[:, K:2 * K], u[:, 2 * K])
        self._record_routing(out, n)
        # 4. roll back each row to t0, d1..dn
        main.keep_prefix(start, n + 1, out.mamba_states)
        # 5. MTP cache: teacher-forced entries for the kept positions; the one at n drafts the next round
        h_mtp, states = model.mtp_step(1, out.hidden_states, emitted, mtp, keep_mamba_states=bool(mtp.ssm))
        mtp.keep_prefix(start_mtp, n + 1, states)
        rows = torch.arange(b, device=n.device)
        self.draft_h = h_mtp[rows, n][:, None]
        self.last = emitted[rows, n]
        self.stats["rounds"] += 1
        self._emit(events, list(range(b)), emitted, n, out.logits, p)

    def _greedy_round(self, events, main, mtp, K: int) -> None:
        """All rows greedy: the whole round (drafts, verify, accept, cache rollback, MTP catch-up) is
        speculative.greedy_round, compiled as one graph when the model's decode is compiled."""
        model, b = self.model, main.batch_size
        main.reserve(K + 1)                                                   # capacity checks (host side)
        mtp.reserve(K + 1)
        if self._compiled_round is None or self._compiled_round[0] is not model.decode_compilation:
            fn = functools.partial(greedy_round, model)
            self._compiled_round = (model.decode_compilation,
                                    model.compile_like_decode(fn) if model.decode_is_compiled else fn)
        head = None if self.draft_vocab is None else model.draft_head(self.draft_vocab)
        main_states = [main.layer_state(i) for i in range(model.config.num_hidden_layers)]
        mtp_states = {layer.layer_idx: mtp.layer_state(layer.layer_idx) for layer in model.mtp.layers}
        emitted, n, logits, self.draft_h = self._compiled_round[1](self.last, self.draft_h, main.pos, mtp.pos,
                                                                   main_states, mtp_states, K, head, self.draft_vocab)
        self.last = emitted[torch.arange(b, device=n.device), n]
        self.stats["rounds"] += 1
        self._emit(events, list(range(b)), emitted, n, logits, None)

    def _draft_sampled(self, mtp, K: int, u: torch.Tensor, ahead):
        """K drafts drawn from the MTP head's distributions after the rows' sampling processors (and grammars):
        returns drafts (b, K), their distributions q (b, V) per position, the repetition-penalty `seen` masks per
        position and after the last draft. The MTP cache is stepped and then restored."""
        model, b, seen = self.model, len(self.rows), self.seen
        start_mtp = mtp.pos.clone()                      # the draft steps' entries are temporary
        saved = {i: (mtp.conv[i].clone(), mtp.ssm[i].clone()) for i in mtp.ssm}
        h, drafts, qs, seens = self.draft_h, [], [], []
        vocab = self.draft_vocab if ahead is None else None     # a grammar may allow no token of the draft vocabulary
        for j in range(1, K + 1):
            logits_q = model.draft_logits(h[:, -1:], vocab)                     # (b, 1, V); -inf outside vocab
            if ahead is not None:                     # drafts follow the grammar too (after the drafts before them)
                logits_q = logits_q.masked_fill(~self._grammar_masks(self.rows, [[a] for a in ahead]), float("-inf"))
            seens.append(None if seen is None else seen[:, None])
            q = target_probs_rows(logits_q, self.params, seens[-1])[:, 0]      # (b, V)
            d = draw(q, u[:, j - 1])
            drafts.append(d)
            qs.append(q)
            if ahead is not None:
                for a, t in zip(ahead, d.tolist()):
                    a.append(t)
            if seen is not None:
                seen = seen.clone()
                seen[torch.arange(b, device=d.device), d] = True
            if j < K:
                h, _ = model.mtp_step(j + 1, h, d[:, None], mtp)
        seens.append(None if seen is None else seen[:, None])
        mtp.pos.copy_(start_mtp)
        for i, (c, s) in saved.items():
            mtp.conv[i].copy_(c)
            mtp.ssm[i].copy_(s)
        return torch.stack(drafts, 1), qs, seens, seen

    def _want_routing(self) -> bool:
        return any(s.req.return_routed_experts for s in self.rows)

    def _routing(self, out) -> torch.Tensor:
        """(b, L, MoE layers, K) expert ids of a forward's main-model MoE layers."""
        b, L = out.hidden_states.shape[:2]
        layers = sorted(i for i in out.router if i < self.model.config.num_hidden_layers)
        return torch.stack([out.router[i].ids_TK.view(b, L, -1) for i in layers], 2)

    def _record_routing(self, out, n: torch.Tensor) -> None:
        """Keep the routing of the input positions each row kept (t0 and its accepted drafts)."""
        if not out.router:
            return
        ids, keep = self._routing(out).cpu(), (n + 1).tolist()
        for i, seq in enumerate(self.rows):
            if seq.req.return_routed_experts:
                seq.routing.append(ids[i, :keep[i]])

    def _grammar_masks(self, seqs: list[SequenceState], ahead: list[list[list[int]]]) -> torch.Tensor | None:
        """(b, L, V) bool: the tokens row i's grammar allows at position j, after its committed tokens plus
        ahead[i][j] (drafts not yet accepted); None when no row has a grammar (rows without one allow all)."""
        if all(s.grammar is None for s in seqs):
            return None
        L, V = len(ahead[0]), self.model.config.vocab_size
        m = torch.ones(len(seqs), L, V, dtype=torch.bool)
        for i, s in enumerate(seqs):
            for j in range(L if s.grammar is not None else 0):
                allowed = s.grammar.mask(ahead[i][j])
                if allowed is not None:
                    m[i, j] = allowed
        return m.to(self.device)

    def _forced_ahead(self, drafts: torch.Tensor, K: int):
        """Per row with a budget, the token forced at each verify position 0..K (position j is reached only if
        d_1..d_j were accepted, so the look-ahead assumes they were)."""
        if not any(s.budget for s in self.rows):
            return [None] * len(self.rows)
        dl = drafts.tolist()
        out = []
        for s, ds in zip(self.rows, dl):
            if s.budget is None:
                out.append(None)
                continue
            st, row = s.budget_state, []
            for j in range(K + 1):
                f = s.budget.forced(st)
                row.append(f)
                if j < K:
                    st = s.budget.advance(st, f if f is not None else ds[j])
            out.append(row)
        return out

    def _emit(self, events, rows: list[int], tokens, n_acc, logits, p) -> None:
        """Hand each row its tokens [0, n_acc + 1) (one host transfer for the batch), finish rows that stop."""
        L = tokens.shape[1]
        logits = logits[:, -L:]
        if self.seen is not None:                                                # repetition-penalty bookkeeping
            kept = torch.arange(L, device=n_acc.device)[None] <= n_acc[:, None]
            r = torch.tensor(rows, device=self.device)[:, None].expand(-1, L)
            self.seen[r[kept], tokens[kept]] = True
        finite = torch.isfinite(logits).all(-1)
        if p is not None:
            finite &= torch.isfinite(p).all(-1)
        bad = ~finite.all(-1)                                                    # a row whose numbers broke
        alts = None
        if any(self.rows[i].req.logprobs is not None for i in rows):
            top = max((self.rows[i].req.logprobs or 0 for i in rows), default=0)
            probs = p if p is not None else torch.nn.functional.one_hot(tokens, logits.shape[-1]).float()
            lp_raw, lp_sampled, alts = token_logprobs(logits, probs, tokens, top)
        else:
            lp_raw = lp_sampled = torch.zeros(tokens.shape)
        host = [t.tolist() for t in (tokens, n_acc, lp_raw, lp_sampled, bad)]
        alts = [a.tolist() for a in alts] if alts is not None else None
        finished = []
        for j, i in enumerate(rows):
            seq = self.rows[i]
            if host[4][j]:
                seq.finish, seq.error = "error", "the model produced non-finite probabilities for this request"
                events.append(Event(seq.rid, seq.sample, None, "", seq.result()))
                finished.append(i)
                continue
            a = host[1][j]
            for pos in range(L - 1):                                            # speculative acceptance statistics
                self.stats["drafted"][pos] += 1 if pos <= a else 0
                self.stats["accepted"][pos] += 1 if pos < a else 0
            for k in range(a + 1):
                tok = host[0][j][k]
                alt = list(zip(alts[1][j][k], alts[0][j][k]))[:seq.req.logprobs] if alts and seq.req.logprobs else None
                kept = len(seq.tokens)
                piece = seq.emit(tok, host[2][j][k], host[3][j][k], self.version, alt)
                self.stats["tokens"] += 1
                entry = seq.logprobs[-1] if seq.logprobs is not None and len(seq.tokens) > kept else None
                events.append(Event(seq.rid, seq.sample, tok, piece, seq.result() if seq.finish else None, entry))
                if seq.finish:
                    finished.append(i)
                    break
        for i in sorted(finished, reverse=True):
            if self.rows[i].error is not None:
                for c in (self.cache, self.mtp_cache):
                    if c is not None:                 # stale non-finite K/V must never reach a later occupant
                        for k, v in c.kv.values():
                            k[i].zero_()
                            v[i].zero_()
            self._remove_row(i)
