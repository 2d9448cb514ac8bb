"""Reasoning budget control (white paper §2.7; NVIDIA's server-side logits processor for Nano / Super).

A request that starts inside a thought (its prompt ends with the template's "<think>\\n") and has a budget of N:
    - the model closes the thought itself before N tokens: nothing happens;
    - N thinking tokens are out and the last token ends a line, or N + grace are out: the engine forces the closing
      sequence (default ".\\n</think>\\n\\n", tokenized with the model's tokenizer) one token per step, then lets
      the answer continue freely.
budget 0 closes the thought at once. grace defaults to 10% of the budget (NIM's default), at least 8 tokens.
A closing tag the model has begun ("</th" with a byte-level tokenizer) is let finish: that is a natural close.

The rule is a pure state machine: `forced(state)` says which token must come next (None: the model chooses) and
`advance(state, token)` returns the state after a token, so a speculative verifier can look ahead over draft
tokens without copying or mutating anything.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class BudgetState:
    thinking: bool = True                   # inside a thought (the prompt opened it)
    count: int = 0                          # thinking tokens produced
    forcing: tuple[int, ...] = ()           # closing tokens still to emit
    forced: bool = False                    # the budget cut this thought
    tail: str = ""                          # the last characters of the thought (newline / closing-tag checks)


class ReasoningBudget:
    def __init__(self, budget: int, close_ids: list[int], end_think: str, decode, grace: int | None = None):
        if not isinstance(budget, int) or budget < 0:
            raise ValueError(f"reasoning budget {budget!r} must be an integer >= 0 (tokens of thinking).")
        if not close_ids:
            raise ValueError("the thought-closing text encodes to no tokens; give a non-empty thought_close.")
        self.budget, self.close_ids, self.end_think, self.decode = budget, tuple(close_ids), end_think, decode
        self.grace = grace if grace is not None else max(8, budget // 10)

    def forced(self, s: BudgetState) -> int | None:
        """The token that must come next in state s, or None to let the model choose."""
        if not s.thinking:
            return None
        if s.forcing:
            return s.forcing[0]
        if any(s.tail.endswith(self.end_think[:k]) for k in range(1, len(self.end_think))):
            return None                     # the model is writing the closing tag itself
        over = s.count >= self.budget + self.grace
        at_line_end = s.count >= self.budget and (self.budget == 0 or s.tail.endswith("\n"))
        return self.close_ids[0] if over or at_line_end else None

    def advance(self, s: BudgetState, token: int) -> BudgetState:
        """The state after `token` was emitted (forced or chosen)."""
        if not s.thinking:
            return s
        forcing = s.forcing
        if not forcing and self.forced(s) is not None:
            forcing = self.close_ids                                 # the budget cuts the thought here
        if forcing:
            rest = forcing[1:]
            return replace(s, forcing=rest, forced=True, thinking=bool(rest))
        tail = (s.tail + self.decode([token]))[-64:]
        return replace(s, count=s.count + 1, tail=tail, thinking=self.end_think not in tail)
