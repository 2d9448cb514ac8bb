"""Reasoning budget control (white paper §2.7; nemotron3_spec.md §3.2, NVIDIA's server-side logits processor).

A request that starts inside a thought (its prompt ends with the template's "<think>\\n") and has a budget of N:
    - the model closes the thought itself before N tokens: nothing happens;
    - N thinking tokens are out and the last token ends a line, or N + grace are out: the engine forces the closing
      sequence (default ".\\n</think>\\n\\n", tokenized with the model's tokenizer) one token per step, then lets
      the answer continue freely.
budget 0 closes the thought at once. grace defaults to 10% of the budget (NIM's default), at least 8 tokens.
A closing tag the model has begun ("</th" with a byte-level tokenizer) is let finish: that is a natural close.
"""

from __future__ import annotations


class ReasoningBudget:
    def __init__(self, budget: int, close_ids: list[int], end_think: str, decode, grace: int | None = None,
                 thinking: bool = True):
        if budget < 0:
            raise ValueError(f"reasoning budget {budget} must be >= 0 (tokens of thinking).")
        self.budget, self.close_ids, self.end_think, self.decode = budget, close_ids, end_think, decode
        self.grace = grace if grace is not None else max(8, budget // 10)
        self.thinking = thinking            # inside a thought (the prompt opened it)
        self.count = 0                      # thinking tokens produced
        self.forcing: list[int] = []        # closing tokens still to emit
        self.forced = False                 # the budget cut this thought
        self._text = ""

    def next_forced(self) -> int | None:
        """The token the engine must emit next, or None to let the model choose."""
        if not self.thinking:
            return None
        closing = any(self._text.endswith(self.end_think[:k]) for k in range(1, len(self.end_think)))
        if not self.forcing and not closing and (self.count >= self.budget + self.grace
                                 or (self.count >= self.budget and (self.budget == 0 or self._text.endswith("\n")))):
            self.forcing, self.forced = list(self.close_ids), True
        return self.forcing[0] if self.forcing else None

    def observe(self, token: int) -> None:
        """Account for the token just emitted (forced or chosen)."""
        self.next_forced()                  # bring the state up to date whoever asked before (a verifier's copy)
        if not self.thinking:
            return
        if self.forcing:
            self.forcing.pop(0)
            if not self.forcing:
                self.thinking = False
            return
        self.count += 1
        self._text = (self._text + self.decode([token]))[-64:]
        if self.end_think in self._text:
            self.thinking = False           # closed by the model itself
