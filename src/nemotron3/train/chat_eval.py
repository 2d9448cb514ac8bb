"""Evaluation of a chat model on held-out conversations of the built-in SFT set (sft_data.py), through the inference
engine (batched greedy decoding, reasoning budgets) and the one chat-format parser (chat_format.parse_tool_calls;
the engine's split_reasoning separates the thought from the answer). `nemotron3 demo` and bench/sft_budget.py both
use it.

Items: each held-out conversation gives, per assistant turn that ends it or calls a tool, the prompt before that
turn and what the turn must say:
    answer   the reply's content (after </think>) equals the reference answer, exactly ("1665", "v4")
    call     the reply's content is one well-formed <tool_call> of the right function with the right arguments
Settings: thinking on (prompt ends "<think>\\n"), thinking off (prompt ends "<think></think>", as the template
renders enable_thinking=False), or thinking on with a reasoning budget of N tokens: the engine forces
".\\n</think>\\n\\n" after N thinking tokens (the close the SFT augmentation trains on), then the model answers.
Left out: sampling (greedy only: the demo's numbers are deterministic), multi-turn tool episodes (rl/rollout.py
runs those); a call item checks the first call of a tool conversation, an answer item the turn after the result.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..chat_format import END_OF_TURN, IM_START, ToolCall, ToolCallError, parse_tool_calls

REASONING_TASKS = ("arithmetic", "follow_up")
"""Tasks whose answer needs the worked steps (the budget and thinking on/off measure these)."""


@dataclass
class EvalItem:
    kind: str
    """'answer' (the reply must be `answer`) or 'call' (the reply must be the tool call `call`)."""
    task: str
    """The built-in conversation kind: arithmetic, lookup, calculator, key_lookup or follow_up."""
    messages: list[dict]
    """The prompt: the conversation up to the turn the model must write."""
    tools: list[dict] | None = None
    answer: str | None = None
    call: ToolCall | None = None


def eval_items(n: int, seed: int = 0) -> list[EvalItem]:
    """Items from the first n held-out built-in conversations (module docstring)."""
    from .sft_data import builtin_conversations, builtin_records
    items = []
    records = builtin_records(n, seed, "heldout")
    for rec, conv in zip(records, builtin_conversations(n, seed, "heldout")):
        for i, m in enumerate(conv.messages):
            if m["role"] != "assistant":
                continue
            if m.get("tool_calls"):
                c = m["tool_calls"][0]
                items.append(EvalItem("call", rec["kind"], conv.messages[:i], conv.tools,
                                      call=ToolCall(c["name"], c["arguments"])))
            elif i == len(conv.messages) - 1:
                items.append(EvalItem("answer", rec["kind"], conv.messages[:i], conv.tools, answer=m["content"]))
    return items


def tool_call_matches(content: str, call: ToolCall, tools=None) -> bool:
    """True iff `content` (the answer part of a reply) is exactly one well-formed call of `call.name` with
    `call.arguments`."""
    try:
        _, calls = parse_tool_calls(content, tools)
    except ToolCallError:
        return False
    return calls == [call]


def grade(item: EvalItem, content: str) -> bool:
    """Is `content` (the reply after its thought, without the end-of-turn marker) what the item asks for?"""
    if item.kind == "call":
        return tool_call_matches(content, item.call, item.tools)
    return content.strip() == item.answer


@dataclass
class Reply:
    item: EvalItem
    prompt: str
    """The rendered prompt, ending in the generation prompt."""
    result: object
    """The engine's Result (.text, .reasoning, .content, .budget_forced, .token_ids)."""
    right: bool


def run_items(engine, tokenizer, items: list[EvalItem], thinking: bool = True, budget: int | None = None,
              max_tokens: int = 160, batch: int = 64, budget_grace: int = 0) -> list[Reply]:
    """Greedy replies to every item under one setting (thinking on / off, budget in thinking tokens or None),
    generated `batch` at a time, each graded. 160 tokens: a byte-level tool call is ~130. budget_grace 0: the
    thought is cut at exactly `budget` tokens (the built-in thoughts have no newline to wait for)."""
    from ..infer import Request
    prompts = [tokenizer.apply_chat_template(it.messages, tools=it.tools, add_generation_prompt=True,
                                             enable_thinking=thinking) for it in items]
    stop = [tokenizer.end_of_turn] if getattr(tokenizer, "end_of_turn", None) else []   # byte models end on text
    replies = []
    for s in range(0, len(items), batch):
        reqs = [Request(tokenizer.encode(p), max_tokens, stop=stop, thinking=thinking,
                        reasoning_budget=budget if thinking else None, budget_grace=budget_grace)
                for p in prompts[s:s + batch]]
        for it, p, res in zip(items[s:s + batch], prompts[s:s + batch], engine.generate(reqs)):
            replies.append(Reply(it, p, res, grade(it, res.content)))
    return replies


def accuracy(replies: list[Reply], tasks=None, kind: str | None = None) -> float | None:
    """Share right among the replies of the given tasks / kind (None when there are none)."""
    chosen = [r.right for r in replies if (tasks is None or r.item.task in tasks) and (kind is None or
                                                                                       r.item.kind == kind)]
    return sum(chosen) / len(chosen) if chosen else None


def thinking_tokens(replies: list[Reply], tokenizer) -> float:
    """Mean tokens of reasoning per reply (0 for replies without a thought)."""
    return sum(len(tokenizer.encode(r.result.reasoning or "")) for r in replies) / max(len(replies), 1)


def transcript(reply: Reply, width: int = 110) -> str:
    """The user's last message and the model's turn as generated (thought included), on a few short lines."""
    question = next(m["content"] for m in reversed(reply.item.messages) if m["role"] in ("user", "tool"))
    want = reply.item.answer if reply.item.kind == "answer" else \
        f"{reply.item.call.name}({', '.join(f'{k}={v!r}' for k, v in reply.item.call.arguments.items())})"
    header = f"{IM_START}assistant\n"
    gen = reply.prompt[reply.prompt.rindex(header) + len(header):] + reply.result.text.split(END_OF_TURN)[0]
    line = f"  [{'right' if reply.right else 'wrong'}] {question!r} -> {gen!r}   (want {want})"
    return line if len(line) <= width * 3 else line[:width * 3 - 3] + "..."
