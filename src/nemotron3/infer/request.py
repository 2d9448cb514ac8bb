"""What the engine is asked and what it gives back: Request (prompt, sampling, stops, budget, n samples, grammar),
Result, Event, and SequenceState, one sample's host-side bookkeeping (its tokens, incremental detokenization,
stop tokens and strings, budget state, logprobs, versions, routing)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..chat_format import FORCED_THINK_CLOSE
from .budget import BudgetState, ReasoningBudget
from .reasoning import split_reasoning
from .sampling import SamplingParams

@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int = 64
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    """Stop strings: generation ends before the first one (it is not part of the text)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Extra stop tokens besides the tokenizer's eos."""
    ignore_eos: bool = False
    """Keep generating past the tokenizer's eos (benchmarks that need a fixed length; vLLM's ignore_eos)."""
    logprobs: int | None = None
    """None: no per-token logprob dicts; 0: the chosen token's; n: also the n most likely tokens at each step."""
    reasoning_budget: int | None = None
    """Thinking tokens allowed before the thought is closed (needs thinking=True)."""
    thinking: bool = False
    """The prompt opened a thought (chat template with enable_thinking): output starts as reasoning."""
    budget_grace: int | None = None
    """Extra thinking tokens allowed while waiting for a newline after the budget (default 10%, at least 8)."""
    thought_close: str = FORCED_THINK_CLOSE
    """What a budget forces to end the thought (NVIDIA's: ".\n</think>\n\n"; match the model's training format)."""
    n: int = 1
    """Samples of this prompt: prefilled once, forked into n rows (sample i seeds its stream with (seed, i))."""
    return_routed_experts: bool = False
    """Also return the experts every MoE layer routed each input token to (RL's router replay); runs eager."""
    grammar: object | None = None
    """Constrained decoding (structured output): an object with fork() -> a fresh copy per sample,
    mask(ahead: list[int]) -> (V,) bool tensor of the tokens allowed after its committed tokens plus `ahead` (or None
    for no constraint now), and advance(token) to commit an emitted token. Masked tokens get probability 0 in the
    target (and draft) distributions, so a draft the grammar rejects is rejected by the accept rule."""


@dataclass
class Result:
    token_ids: list[int]
    text: str
    reasoning: str | None
    content: str
    finish_reason: str                    # stop | length | abort | error
    prompt_tokens: int
    logprobs: list[dict] | None = None
    budget_forced: bool = False
    request_id: int = 0
    sample: int = 0
    token_logprobs: torch.Tensor | None = None
    """(n,) float32 when the request set `logprobs` (0 is enough): the raw model's log-probability of each token."""
    sampled_logprobs: torch.Tensor | None = None
    """(n,) float32 likewise: its log-probability under the distribution actually sampled (after temperature /
    top-k / top-p / min-p / penalty; 0 for greedy and forced tokens) — what RL's importance weights use."""
    versions: list[int] | None = None
    """The policy version (update_weights) that produced each output token."""
    stop_token: tuple[int, float, float, int] | None = None
    """(id, raw logprob, sampled logprob, version) of the stop token (eos or a stop_token_ids entry) that ended the
    output. It is not in token_ids nor in text, but RL trains on it (the model must learn to stop), so its
    logprobs and policy version are kept. Logprobs are 0 unless the request set `logprobs`."""
    routed_experts: torch.Tensor | None = None
    """With return_routed_experts: (prompt + output - 1 positions, MoE layers, top-k) expert ids, the routing of
    every token the model read (prompt, then each output token but the last; the stop token, when one ended the
    output, counts as its last token), in the order of the main model's MoE layers."""
    error: str | None = None


@dataclass
class Event:
    request_id: int
    sample: int
    token_id: int | None                  # None for an event that only finishes (abort, error)
    text: str                             # new text made visible by this token (may be empty)
    result: Result | None = None          # set on the sequence's last event
    logprob: dict | None = None           # this token's logprob entry when the request asked for logprobs (streams)


class IdsOnly:
    """Stand-in tokenizer when the caller works in ids (model.generate): no text, stops by id only."""
    eos_token_id = None

    def decode(self, ids):
        return ""

    def encode(self, text):
        raise ValueError("a reasoning budget needs the model's tokenizer (Engine(model, tokenizer)).")


class SequenceState:
    """One sample's host-side state: tokens, text (incremental detokenization), stops, budget, logprobs."""

    def __init__(self, rid: int, sample: int, req: Request, tok, budget: ReasoningBudget | None):
        self.rid, self.sample, self.req, self.tok = rid, sample, req, tok
        self.tokens: list[int] = []
        self.lp_raw: list[float] = []
        self.lp_sampled: list[float] = []
        self.versions: list[int] = []
        self.logprobs = [] if req.logprobs is not None else None
        self.finish, self.error, self.text, self.shown = None, None, "", 0
        self.stop_token = None
        self._prefix, self._read = 0, 0          # incremental detokenization offsets (vLLM's scheme)
        self.stops = {None if req.ignore_eos else tok.eos_token_id, *req.stop_token_ids} - {None}
        self.budget = budget
        self.budget_state = BudgetState() if budget is not None else None
        self.routing: list[torch.Tensor] = []     # (positions, MoE layers, K) blocks, when asked for
        self.grammar = req.grammar.fork() if req.grammar is not None else None

    def emit(self, token: int, lp_raw: float, lp_sampled: float, version: int, top=None) -> str:
        """Append a token; returns the text that became visible. Sets finish when a stop condition hits."""
        if self.budget is not None:
            self.budget_state = self.budget.advance(self.budget_state, token)
        if self.grammar is not None:
            self.grammar.advance(token)
        if token in self.stops:                   # a stop token is not part of the output, nor its logprob
            self.finish, self.stop_token = "stop", (token, lp_raw, lp_sampled, version)
        else:
            self.tokens.append(token)
            self.lp_raw.append(lp_raw)
            self.lp_sampled.append(lp_sampled)
            self.versions.append(version)
            if self.logprobs is not None:
                self.logprobs.append({"token": token, "logprob": lp_raw, "top": top or []})
            self.text += self._new_text()
            for s in self.req.stop:
                if s in self.text:
                    self.text = self.text[:self.text.index(s)]
                    self.finish = "stop"
        if len(self.tokens) >= self.req.max_tokens and self.finish is None:
            self.finish = "length"
        hold = 0 if self.finish else max((len(s) - 1 for s in self.req.stop), default=0)  # a stop may be forming
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

    def result(self) -> Result:
        reasoning, content = split_reasoning(self.text, self.req.thinking)
        routed = None
        if self.req.return_routed_experts:
            n_out = len(self.tokens) + (self.stop_token is not None)   # a stop token's predecessor was read
            n_read = len(self.req.prompt_ids) + max(n_out - 1, 0)
            routed = torch.cat(self.routing)[:n_read] if self.routing else None
        return Result(self.tokens, self.text, reasoning, content, self.finish or "abort", len(self.req.prompt_ids),
                      self.logprobs, bool(self.budget_state and self.budget_state.forced), self.rid, self.sample,
                      *((torch.tensor(self.lp_raw), torch.tensor(self.lp_sampled)) if self.logprobs is not None
                        else (None, None)), self.versions, self.stop_token, routed, self.error)


