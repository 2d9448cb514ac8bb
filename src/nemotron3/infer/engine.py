"""The inference engine: a batch of requests with different prompt lengths, prefilled in chunks, then decoded with
the hybrid cache, plainly or with MTP self-speculative decoding; stop tokens and strings, logprobs, streaming and
a reasoning budget per request.

    engine = Engine(model, tokenizer, num_speculative_tokens=3)
    for ev in engine.stream([Request(prompt_ids=ids, max_tokens=64)]):    # (request, token, text piece) as made
        print(ev.text, end="")
    results = engine.last_results

Speculative round (nemotron3_spec.md §2.4-2.5), rows of a batch advance together:
    1. draft: MTP depth 1 on (hidden of the last verified position, the token just chosen), then the same block
       again on (its own output, the draft) for depths 2..K (temporary MTP cache entries, dropped afterwards)
    2. verify: one forward of the main model over [t0, d1..dK]; Mamba layers record their state after each token
    3. accept: greedy - drafts equal to the target's argmax; sampling - accept d_j with prob min(1, p(d_j)/q(d_j)),
       else resample from norm(max(p - q, 0)) (Leviathan et al. 2023) so the output is distributed as p exactly.
       A batch keeps n = the fewest drafts any live row accepted; every row still emits a token at n (its accepted
       draft or its correction), which is a valid sample, so greedy output is unchanged and sampling stays exact.
    4. roll back: keep the Mamba states after t0, d1..dn; attention just moves its position back
    5. catch the MTP cache up on the kept positions (teacher-forced, as in training); its last output drafts next.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from ..model.cache import HybridCache
from .budget import ReasoningBudget
from .sampling import SamplingParams, logprobs_of, sample, target_probs

END_THINK = "</think>"
CLOSE_THOUGHT = ".\n</think>\n\n"


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int = 64
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    """Stop strings: generation ends before the first one (it is not part of the text)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Extra stop tokens besides the tokenizer's eos."""
    logprobs: int | None = None
    """None: no logprobs; 0: the chosen token's; n: also the n most likely tokens at each step."""
    reasoning_budget: int | None = None
    """Thinking tokens allowed before the thought is closed (needs thinking=True)."""
    thinking: bool = False
    """The prompt opened a thought (chat template with enable_thinking): output starts as reasoning."""
    budget_grace: int | None = None
    """Extra thinking tokens allowed while waiting for a newline after the budget (default 10%, at least 8)."""
    thought_close: str = CLOSE_THOUGHT
    """What a budget forces to end the thought (NVIDIA's: ".\n</think>\n\n"; match the model's training format)."""


@dataclass
class Result:
    token_ids: list[int]
    text: str
    reasoning: str | None
    content: str
    finish_reason: str                    # stop | length
    prompt_tokens: int
    logprobs: list[dict] | None = None
    budget_forced: bool = False


@dataclass
class Event:
    index: int                            # which request
    token_id: int
    text: str                             # new text made visible by this token (may be empty)


class _Row:
    """One request's running state."""

    def __init__(self, req: Request, tokenizer, device):
        self.req, self.tok = req, tokenizer
        self.tokens: list[int] = []
        self.seen = list(req.prompt_ids)                     # prompt + output ids (repetition penalty)
        self.device = device
        # greedy without a repetition penalty needs no distribution: the batch's argmax is the choice
        self.plain_greedy = req.sampling.greedy and req.sampling.repetition_penalty == 1.0
        self.done, self.finish, self.text, self.shown = False, "length", "", 0
        self._prefix, self._read = 0, 0          # incremental detokenization offsets (vLLM's scheme)
        self.logprobs = [] if req.logprobs is not None else None
        self.generator = torch.Generator(device=device).manual_seed(req.sampling.seed) \
            if req.sampling.seed is not None else None
        self.stops = {tokenizer.eos_token_id, *req.stop_token_ids} - {None}
        self.budget = None
        if req.reasoning_budget is not None:
            if not req.thinking:
                raise ValueError("reasoning_budget needs a prompt that opens a thought (thinking=True / "
                                 "enable_thinking in the chat template).")
            self.budget = ReasoningBudget(req.reasoning_budget, tokenizer.encode(req.thought_close), END_THINK,
                                          tokenizer.decode, grace=req.budget_grace)

    def emit(self, token: int, logits: torch.Tensor | None) -> str:
        """Append a token; returns the text that became visible. Sets done when a stop condition hits."""
        self.tokens.append(token)
        self.seen.append(token)
        if self.budget is not None:
            self.budget.observe(token)
        if self.logprobs is not None and logits is not None:
            self.logprobs.append({"token": token, **logprobs_of(logits, token, self.req.logprobs)})
        if token in self.stops:
            self.tokens.pop()
            self.done, self.finish = True, "stop"
        else:
            self.text += self._new_text()
            for s in self.req.stop:
                if s in self.text:
                    self.text = self.text[:self.text.index(s)]
                    self.done, self.finish = True, "stop"
        if len(self.tokens) >= self.req.max_tokens and not self.done:
            self.done = True
        hold = 0 if self.done else max((len(s) - 1 for s in self.req.stop), default=0)  # a stop string may be forming
        visible = self.text[:max(self.shown, len(self.text) - hold)]
        piece, self.shown = visible[self.shown:], len(visible)
        return piece

    def _new_text(self) -> str:
        """Text added by the tokens since the last complete character: decodes a short window, not the whole
        output, so a long generation costs O(n) and not O(n^2); an incomplete UTF-8 sequence waits."""
        new = self.tok.decode(self.tokens[self._prefix:])
        if new.endswith("\ufffd"):
            return ""
        old = self.tok.decode(self.tokens[self._prefix:self._read])
        self._prefix, self._read = self._read, len(self.tokens)
        return new[len(old):]

    def seen_tensor(self, extra=()) -> torch.Tensor | None:
        if self.req.sampling.repetition_penalty == 1.0:
            return None
        return torch.tensor(self.seen + list(extra), dtype=torch.long, device=self.device)

    def result(self) -> Result:
        text = self.text
        reasoning, content = None, text
        if self.req.thinking or text.lstrip().startswith("<think>"):
            body = text.lstrip().removeprefix("<think>")
            if END_THINK in body:
                reasoning, content = body.split(END_THINK, 1)
            else:
                reasoning, content = body, ""
            reasoning, content = reasoning.strip(), content.strip()
        return Result(self.tokens, text, reasoning, content, self.finish, len(self.req.prompt_ids), self.logprobs,
                      bool(self.budget and self.budget.forced))


class _IdsOnly:
    """Stand-in tokenizer when the caller works in ids (model.generate): no text, stops by id only."""
    eos_token_id = None

    def decode(self, ids):
        return ""

    def encode(self, text):
        raise ValueError("a reasoning budget needs the model's tokenizer (Engine(model, tokenizer)).")


class Engine:
    def __init__(self, model, tokenizer=None, num_speculative_tokens: int = 0, prefill_chunk: int = 512):
        if num_speculative_tokens < 0:
            raise ValueError(f"num_speculative_tokens={num_speculative_tokens} must be >= 0 (0 = plain decoding).")
        if num_speculative_tokens and model.mtp is None:
            raise ValueError("num_speculative_tokens > 0 needs MTP heads; this model has none "
                             "(num_nextn_predict_layers=0). Use 0 for plain decoding.")
        self.model, self.tok, self.K, self.chunk = model, tokenizer or _IdsOnly(), num_speculative_tokens, prefill_chunk
        self.last_results: list[Result] = []
        self.reset_stats()

    def reset_stats(self):
        self.stats = {"rounds": 0, "drafted": [0] * self.K, "accepted": [0] * self.K, "tokens": 0}

    def acceptance(self) -> list[float]:
        """Share of drafts accepted at each draft position 1..K (over live rows of every round)."""
        return [a / d if d else 0.0 for a, d in zip(self.stats["accepted"], self.stats["drafted"])]

    def generate(self, requests: list[Request]) -> list[Result]:
        for _ in self.stream(requests):
            pass
        return self.last_results

    # ------------------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def stream(self, requests: list[Request]):
        model, cfg = self.model, self.model.config
        device = model.lm_head.weight.device
        self.check(requests)
        rows = [_Row(r, self.tok, device) for r in requests]
        B, L = len(rows), max(len(r.prompt_ids) for r in requests)
        ids = torch.zeros(B, L, dtype=torch.long, device=device)
        mask = torch.zeros(B, L, dtype=torch.long, device=device)
        for i, r in enumerate(requests):                                   # left padding
            ids[i, L - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, device=device)
            mask[i, L - len(r.prompt_ids):] = 1
        max_len = L + max(r.max_tokens for r in requests) + self.K + 2
        if model.decode_is_compiled:               # power-of-two cache lengths: the compiled step is reused
            max_len = max(256, 1 << (max_len - 1).bit_length())
        dtype = model.lm_head.weight.dtype
        cache = HybridCache(cfg, B, max_len, device=device, dtype=dtype)
        spec = self.K > 0
        mtp_cache = HybridCache(cfg, B, max_len, device, dtype, include_mtp=True, include_main=False) if spec else None
        # prefill in chunks: peak activation memory is set by the chunk, not the prompt
        hs = []
        for s in range(0, L, self.chunk):
            out = model(ids[:, s:s + self.chunk], mask[:, :s + self.chunk], cache, logits_to_keep=1)
            hs.append(out.hidden_states if spec else None)
        logits = out.logits[:, -1]
        last = self._choose(rows, logits)
        for i, row in enumerate(rows):
            yield from self._emit(i, row, int(last[i]), logits[i])
        draft_h = None
        if spec:
            next_ids = torch.cat([ids[:, 1:], last[:, None]], 1)
            for c, s in enumerate(range(0, L, self.chunk)):
                m = mask[:, s:s + self.chunk]
                draft_h = self._mtp_catch_up(hs[c], next_ids[:, s:s + self.chunk], None if bool(m.all()) else m,
                                             mtp_cache)
        while not all(r.done for r in rows):
            events, last, draft_h = self._step(rows, last, draft_h, cache, mtp_cache)
            yield from events
        self.last_results = [r.result() for r in rows]

    def _step(self, rows, last, draft_h, cache, mtp_cache):
        """One decode round for every row: a plain step, or (with MTP) draft, verify, accept, roll back, catch up.
        Returns (events, the next t0 per row, the next round's MTP hidden state)."""
        model, events = self.model, []
        if not self.K:
            logits = model(last[:, None], cache=cache, logits_to_keep=1).logits[:, -1]
            last = self._choose(rows, logits)
            for i, row in enumerate(rows):
                if not row.done:
                    events += self._emit(i, row, int(last[i]), logits[i])
            return events, last, None
        # 1. draft K tokens
        drafts, q = self._draft(rows, draft_h, last, mtp_cache)
        # 2. verify [t0, d1..dK] in one forward, recording Mamba states per token
        start = cache.start_history()
        out = model(torch.cat([last[:, None], drafts], 1), cache=cache)
        vlogits = out.logits                                             # (B, K+1, V)
        # 3. accept (per row), then the batch keeps the smallest count of live rows
        chosen, n = self._accept(rows, drafts, q, vlogits)
        # 4. roll back to t0, d1..dn
        cache.rollback(start, n + 1)
        new_last = torch.empty_like(last)
        for i, row in enumerate(rows):
            toks = chosen[i][:n + 1]
            new_last[i] = toks[-1]
            for j, t in enumerate(toks):
                if not row.done:
                    events += self._emit(i, row, t, vlogits[i, j])
        self.stats["rounds"] += 1
        # 5. MTP cache: teacher-forced entries for the kept positions; the last one drafts the next round
        next_ids = torch.cat([drafts[:, :n], new_last[:, None]], 1)
        mtp_cache.pos = start
        draft_h = self._mtp_catch_up(out.hidden_states[:, :n + 1], next_ids, None, mtp_cache)
        return events, new_last, draft_h

    def _emit(self, i, row, token, logits) -> list[Event]:
        piece = row.emit(token, logits)
        self.stats["tokens"] += 1
        return [Event(i, token, piece)]

    def check(self, requests):
        """Raise ValueError naming the problem for a request the engine cannot run (empty prompt, ids outside
        the vocabulary, prompt + max_tokens over the context)."""
        if not requests:
            raise ValueError("no requests.")
        limit = self.model.config.max_position_embeddings
        for r in requests:
            if not r.prompt_ids:
                raise ValueError("empty prompt: give at least one token.")
            if not isinstance(r.max_tokens, int) or r.max_tokens < 1:
                raise ValueError(f"max_tokens={r.max_tokens!r} must be a positive integer.")
            if len(r.prompt_ids) + r.max_tokens > limit:
                raise ValueError(f"prompt ({len(r.prompt_ids)} tokens) + max_tokens ({r.max_tokens}) exceeds the "
                                 f"model's context of {limit} (max_position_embeddings); shorten the prompt or ask "
                                 f"for fewer tokens.")
            V = self.model.config.vocab_size
            if min(r.prompt_ids) < 0 or max(r.prompt_ids) >= V:
                raise ValueError(f"prompt ids must lie in [0, {V}) (vocab_size is {V}); tokenize with this model's "
                                 f"tokenizer.")

    def _choose(self, rows, logits):
        """Next token per row from logits (B, V): the budget's forced token, or a sample of the row's target."""
        out, argmax = [], logits.argmax(-1).tolist()
        for row, lg, am in zip(rows, logits, argmax):
            forced = row.budget.next_forced() if row.budget is not None else None
            if forced is not None or row.plain_greedy:
                out.append(forced if forced is not None else am)
                continue
            p = target_probs(lg, row.req.sampling, row.seen_tensor())
            out.append(int(p.argmax()) if row.req.sampling.greedy else int(sample(p, row.generator)))
        return torch.tensor(out, device=logits.device)

    def _mtp_catch_up(self, h, next_ids, mask, mtp_cache):
        """MTP depth 1 over positions whose next token is known: writes them into the MTP cache, returns the last
        position's MTP hidden state (drafts the next token)."""
        model = self.model
        mtp_cache.record_padding(mask, h.shape[1])
        pos = mtp_cache.pos
        out = model.mtp.step(1, h, model.backbone.embeddings(next_ids), mask, mtp_cache, pos)
        mtp_cache.pos += h.shape[1]
        return out[:, -1:]

    def _draft(self, rows, draft_h, last, mtp_cache):
        """K drafts per row from the MTP head(s): depth 1 from the caught-up state, then depth j from depth j-1's
        output and draft (one block reused when there are fewer blocks than K). Returns (drafts (B, K), q list)."""
        model = self.model
        pos0 = mtp_cache.pos
        saved = {i: (mtp_cache.conv[i].clone(), mtp_cache.ssm[i].clone()) for i in mtp_cache.ssm}
        drafts, qs, h = [], [], draft_h
        extra = [[] for _ in rows]
        for j in range(1, self.K + 1):
            logits = model.lm_head(h[:, -1]).float()
            d, q, argmax = [], [], logits.argmax(-1).tolist()
            for i, row in enumerate(rows):
                if row.plain_greedy:
                    t, p = argmax[i], None
                else:
                    p = target_probs(logits[i], row.req.sampling, row.seen_tensor(extra[i]))
                    t = int(p.argmax()) if row.req.sampling.greedy else int(sample(p, row.generator))
                d.append(t)
                q.append(p)
                extra[i].append(t)
            d = torch.tensor(d, device=last.device)
            drafts.append(d)
            qs.append(q)
            if j < self.K:       # temporary entries at the following positions, dropped after this round
                mtp_cache.record_padding(None, 1)
                h = model.mtp.step(j + 1, h, model.backbone.embeddings(d[:, None]), None, mtp_cache, mtp_cache.pos)
                mtp_cache.pos += 1
        mtp_cache.pos = pos0
        for i, (c, s) in saved.items():
            mtp_cache.conv[i].copy_(c)
            mtp_cache.ssm[i].copy_(s)
        return torch.stack(drafts, 1), qs

    def _accept(self, rows, drafts, qs, vlogits):
        """Per row: the tokens it emits if the batch keeps n drafts (accepted drafts, then its correction or bonus),
        and n = the fewest drafts a live row accepted (budget forcing counts as a rejection at its position)."""
        K = self.K
        chosen, counts = [], []
        vargmax, dl = vlogits.argmax(-1).tolist(), drafts.tolist()
        for i, row in enumerate(rows):
            budget = copy.deepcopy(row.budget) if row.budget is not None else None
            toks, a = [], 0
            for j in range(K + 1):
                forced = budget.next_forced() if budget is not None else None
                if forced is not None:
                    toks.append(forced)
                    break
                if row.plain_greedy:                                      # argmax equality, no distributions
                    if j == K or dl[i][j] != vargmax[i][j]:
                        toks.append(vargmax[i][j])
                        break
                    toks.append(dl[i][j])
                    a += 1
                    if budget is not None:
                        budget.observe(dl[i][j])
                    continue
                p = target_probs(vlogits[i, j], row.req.sampling, row.seen_tensor(toks))
                if j == K:                                                # every draft accepted: bonus token
                    toks.append(int(p.argmax()) if row.req.sampling.greedy else int(sample(p, row.generator)))
                    break
                d = int(drafts[i, j])
                if row.req.sampling.greedy:
                    ok = d == int(p.argmax())
                else:
                    qd = float(qs[j][i][d])
                    ok = float(torch.rand((), generator=row.generator, device=p.device)) < min(1.0, float(p[d]) / qd)
                if not ok:
                    if row.req.sampling.greedy:
                        toks.append(int(p.argmax()))
                    else:
                        resid = (p - qs[j][i]).clamp(min=0)
                        resid = resid / resid.sum() if float(resid.sum()) > 0 else p
                        toks.append(int(sample(resid, row.generator)))
                    break
                toks.append(d)
                a += 1
                if budget is not None:
                    budget.observe(d)
            chosen.append(toks)
            counts.append(len(toks) - 1)
            if not row.done:
                for j in range(K):
                    self.stats["drafted"][j] += 1 if j <= a else 0
                    self.stats["accepted"][j] += 1 if j < a else 0
        live = [c for c, r in zip(counts, rows) if not r.done]
        n = min(live) if live else 0
        return chosen, n
