"""Inference: per-request sampling, the batched engine with MTP self-speculative decoding, reasoning budgets.
Files: sampling, budget, engine."""

from .budget import ReasoningBudget
from .engine import Engine, Event, Request, Result
from .sampling import SamplingParams, target_probs

__all__ = ["Engine", "Event", "ReasoningBudget", "Request", "Result", "SamplingParams", "target_probs"]
