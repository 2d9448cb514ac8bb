"""Inference: the engine (add_request / step / abort; batched, chunked prefill, MTP self-speculative decoding),
the one sampler, the accept rule, reasoning budgets and the reasoning parser, and HF-style `generate`.
Files: sampling, speculative, budget, reasoning, engine, generate."""

from .budget import BudgetState, ReasoningBudget
from .engine import Engine, Event, Request, Result
from .generate import generate
from .reasoning import ReasoningStream, split_reasoning
from .sampling import SamplingParams, target_probs

__all__ = ["BudgetState", "Engine", "Event", "ReasoningBudget", "ReasoningStream", "Request", "Result",
           "SamplingParams", "generate", "split_reasoning", "target_probs"]
