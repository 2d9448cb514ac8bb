"""The built-in SFT set: conversations in Nemotron 3's chat format, generated like the pretraining corpus
(deterministic by seed; a held-out split from a disjoint seed stream); chat_eval.py evaluates a model on it.

Kinds (shares of the stream), all short enough for the `tiny` preset at seq_len 512 with the byte tokenizer:
    arithmetic   "3+8-4=?"        reasoning "3+8=11, 11-4=7."          answer "7"                        30%
    lookup       "k3=v7 k12=v4 ... k12?"   reasoning "k12=v4."          answer "v4"                      25%
    calculator   "37*45=?" with the calc tool listed: reasoning "Use calc: 37*45.", the call calc(expr="37*45"), the
                 result as a tool turn, then reasoning "Got 1665." and the answer "1665"                        20%
    key lookup   "k17?" with the lookup tool listed: lookup(key="k17"), the result, the answer               15%
    follow-up    two turns: "3+4=?" -> "7", then "plus 5?" -> "7+5=12." -> "12" (the first thought is dropped
                 from the history, as the template does)                                                    10%
The calculator's operands (two digits times two digits) are beyond what the tiny model can compute, so answering
needs the tool; the lookup tool's keys are not in the prompt at all.
Measured (one seed): `nemotron3 sft` with its defaults (900 steps of 8 rows, lr 3e-3) from the old 900-step demo
model answered 134 held-out items: arithmetic 26/31, follow-ups 11/13, tool calls 34/34 (well formed, right
arguments), answers from tool results 34/34, in-context key lookups 1/22 (associative recall is not learned at this
size and budget); 17 minutes on 2 loaded cores. The demo's short recipe (900 pretraining steps, half of the documents
these conversations, then 150 SFT steps; `nemotron3 demo`) reaches 31% of 35 held-out reasoning items with thinking
on, 14% off, and 46% of 28 tool calls (one seed, 80 held-out conversations): the skills are still climbing there.
Each record carries its kind, which chat_eval.py reports accuracies by.
"""

from __future__ import annotations

import itertools
import random
from .chat import Conversation, conversation_from_record

# schemas kept minimal (no descriptions, no types: strings by default): each character of the tool list is a token
# of a byte-level model's context, and the format's scaffolding alone makes a one-tool conversation ~480 bytes
CALCULATOR = {"type": "function", "function": {"name": "calc", "parameters": {"properties": {"expr": {}}}}}
LOOKUP = {"type": "function", "function": {"name": "lookup", "parameters": {"properties": {"key": {}}}}}


def _arithmetic(rng: random.Random) -> tuple[str, str, int]:
    """(question, worked steps, value) of three one-digit operands joined by + or - (never below zero)."""
    total, expr, steps = rng.randrange(10), "", []
    expr = str(total)
    for _ in range(2):
        x = rng.randrange(10)
        op = "-" if x <= total and rng.random() < 0.5 else "+"
        new = total - x if op == "-" else total + x
        steps.append(f"{total}{op}{x}={new}")
        expr, total = expr + f"{op}{x}", new
    return f"{expr}=?", ", ".join(steps) + ".", total


def arithmetic_chat(rng):
    q, steps, v = _arithmetic(rng)
    return {"messages": [{"role": "user", "content": q},
                         {"role": "assistant", "content": str(v), "reasoning_content": steps}]}


def lookup_chat(rng):
    keys = rng.sample(range(100), rng.randrange(3, 6))
    pairs = {k: rng.randrange(100) for k in keys}
    q = rng.choice(keys)
    return {"messages": [{"role": "user", "content": " ".join(f"k{k}=v{v}" for k, v in pairs.items()) + f". k{q}?"},
                         {"role": "assistant", "content": f"v{pairs[q]}", "reasoning_content": f"k{q}=v{pairs[q]}."}]}


def _tool_chat(tool, question, arg_name, arg, result):
    name = tool["function"]["name"]
    return {"tools": [tool], "messages": [
        {"role": "user", "content": question},
        {"role": "assistant", "content": "", "reasoning_content": f"Use {name}: {arg}.",   # restated: a shorter copy
         "tool_calls": [{"type": "function", "function": {"name": name, "arguments": {arg_name: arg}}}]},
        {"role": "tool", "content": result},
        {"role": "assistant", "content": result, "reasoning_content": f"Got {result}."}]}


def calculator_chat(rng):
    a, b = rng.randrange(10, 100), rng.randrange(10, 100)
    return _tool_chat(CALCULATOR, f"{a}*{b}=?", "expr", f"{a}*{b}", str(a * b))


def key_lookup_chat(rng):
    k, v = rng.randrange(100), rng.randrange(100)
    return _tool_chat(LOOKUP, f"k{k}?", "key", f"k{k}", f"v{v}")


def follow_up_chat(rng):
    a, b, c = rng.randrange(10), rng.randrange(10), rng.randrange(10)
    return {"messages": [
        {"role": "user", "content": f"{a}+{b}=?"},
        {"role": "assistant", "content": str(a + b), "reasoning_content": f"{a}+{b}={a + b}."},
        {"role": "user", "content": f"plus {c}?"},
        {"role": "assistant", "content": str(a + b + c), "reasoning_content": f"{a + b}+{c}={a + b + c}."}]}


KINDS = ((arithmetic_chat, 0.30), (lookup_chat, 0.25), (calculator_chat, 0.20), (key_lookup_chat, 0.15),
         (follow_up_chat, 0.10))


def builtin_record_stream(seed: int = 0, split: str = "train"):
    """Endless deterministic stream of records ({"messages", "tools"?, "kind"}); 'heldout' draws from a disjoint
    seed stream."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}; use 'train' or 'heldout'.")
    rng = random.Random(f"nemotron3-sft-builtin-{seed}-{split}")
    makers, weights = zip(*KINDS)
    while True:
        maker = rng.choices(makers, weights)[0]
        yield maker(rng) | {"kind": maker.__name__.removesuffix("_chat")}       # kind: for evaluation


def builtin_records(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """The first n records of the stream."""
    return list(itertools.islice(builtin_record_stream(seed, split), n))


def builtin_conversations(n: int, seed: int = 0, split: str = "train") -> list[Conversation]:
    return [conversation_from_record(r, f"builtin:{split}:{i}") for i, r in enumerate(builtin_records(n, seed, split))]
