"""The built-in SFT set: conversations in Nemotron 3's chat format, generated like the pretraining corpus
(deterministic by seed; a held-out split from a disjoint seed stream), and the evaluation the demo runs on it.

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
Measured (one seed): `nemotron3 sft` with its defaults (900 steps of 8 rows, lr 3e-3, one conversation per row)
from the 900-step demo model answered 134 held-out items: arithmetic 26/31, follow-ups 11/13, tool calls 34/34 (well
formed, right arguments), answers from tool results 34/34, in-context key lookups 1/22 (associative recall is not
learned at this size and budget). 17 minutes on 2 cores shared with other jobs.
Evaluation items come in two forms: a prompt that should produce a given answer, and a prompt (up to the user's
question of a tool conversation) that should produce a well-formed call with the right arguments, checked with the
one tool-call parser (chat_format.parse_tool_calls).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..chat_format import END_OF_TURN, ToolCall, ToolCallError, parse_tool_calls
from .chat import Conversation, conversation_from_record
from .data import answer_after_thought

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


def builtin_records(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """The first n records of the stream; 'heldout' draws from a disjoint seed stream."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}; use 'train' or 'heldout'.")
    rng = random.Random(f"nemotron3-sft-builtin-{seed}-{split}")
    makers, weights = zip(*KINDS)
    return [rng.choices(makers, weights)[0](rng) for _ in range(n)]


def builtin_conversations(n: int, seed: int = 0, split: str = "train") -> list[Conversation]:
    return [conversation_from_record(r, f"builtin:{split}:{i}") for i, r in enumerate(builtin_records(n, seed, split))]


# ---- evaluation ----
@dataclass
class EvalItem:
    kind: str
    """'answer' (the reply must be `answer`) or 'call' (the reply must be the tool call `call`)."""
    messages: list[dict]
    """The prompt: the conversation up to the turn the model must write."""
    tools: list[dict] | None = None
    answer: str | None = None
    call: ToolCall | None = None


def eval_items(n: int, seed: int = 0) -> list[EvalItem]:
    """Held-out items from n held-out conversations: for each assistant turn, the prompt before it and what the
    turn must say (its answer, or its tool call)."""
    items = []
    for conv in builtin_conversations(n, seed, "heldout"):
        for i, m in enumerate(conv.messages):
            if m["role"] != "assistant":
                continue
            if m.get("tool_calls"):
                c = m["tool_calls"][0]
                items.append(EvalItem("call", conv.messages[:i], conv.tools, call=ToolCall(c["name"], c["arguments"])))
            elif i == len(conv.messages) - 1:
                items.append(EvalItem("answer", conv.messages[:i], conv.tools, answer=m["content"]))
    return items


def tool_call_matches(content: str, call: ToolCall, tools=None) -> bool:
    """True iff `content` (the answer part of a reply) is exactly one well-formed call of `call.name` with
    `call.arguments`."""
    try:
        _, calls = parse_tool_calls(content, tools)
    except ToolCallError:
        return False
    return calls == [call]


def score_reply(item: EvalItem, completion: str) -> bool:
    """Grade a completion generated after the prompt's "<think>\\n" (reasoning, </think>, then the answer)."""
    content = answer_after_thought(completion.split(END_OF_TURN, 1)[0] + END_OF_TURN)
    if content is None:
        return False
    if item.kind == "call":
        return tool_call_matches(content, item.call, item.tools)
    return content == item.answer


def sft_accuracy(model, tokenizer, items: list[EvalItem], max_new_tokens: int = 160) -> dict:
    """Share of items answered right (greedy, thinking on), per kind: {'answer': .., 'call': .., 'all': ..}."""
    right = {"answer": [], "call": []}
    for item in items:
        prompt = tokenizer.apply_chat_template(item.messages, tools=item.tools, add_generation_prompt=True)
        ids = torch.tensor([tokenizer.encode(prompt)], device=model.lm_head.weight.device)
        out = model.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id)
        right[item.kind].append(score_reply(item, tokenizer.decode(out[0, ids.shape[1]:].tolist())))
    every = right["answer"] + right["call"]
    return {k: sum(v) / len(v) for k, v in right.items() if v} | {"all": sum(every) / max(len(every), 1)}
