"""The `tools` environment: multi-turn tool use on a small in-memory inventory database; reward 1 iff the final
database equals the target state (as NeMo-Gym workplace_assistant scores Nemotron 3 agentic tool use: execute the
calls, compare the resulting database with the ground truth).

    user: Set the quantity of pears to 7. Remove figs.
    assistant -> tool calls set_quantity(item="pears", quantity=7), remove_item(item="figs")
    tool      <- {"ok": true}, {"ok": true}
    assistant -> "Done."                                             reward 1: db == target

Episode state (the database) lives in task.data["db"], so each sampled trajectory runs on its own `task.copy()`.
Tool calls arrive parsed, OpenAI style: {"name": "set_quantity", "arguments": {"item": "pears", "quantity": 7}};
arguments are validated against the tool's JSON schema, and a bad call gets an error message back, not a crash.
The episode ends when the assistant answers without tool calls or after `max_turns` assistant turns.

`tools_short` (ShortToolsEnv) asks in the built-in SFT set's tool conversations instead, with its two minimal tools:

    user: 37*45=?     (calc listed)   assistant -> calc(expr="37*45")   tool <- 1665   assistant -> "1665"   reward 1
    user: k17?        (lookup listed) assistant -> lookup(key="k17")    tool <- v42    assistant -> "v42"    reward 1

Two-digit products are beyond the tiny model's arithmetic and lookup values are drawn per task and held only by
the environment, so the right final answer (the whole reply, stripped) needs the right call and copying its result:
what the byte-level demo model was fine-tuned on, so RL starts with a signal (bench/rl_curve.py --envs tools_short).
Reward = (call + answer) / 2: call = 1 when a tool reply held the answer (the call was right), answer = 1 when the
final reply is the answer; half credit for the call keeps a signal where the model, sampling at temperature 1,
rarely copies both right (the SFT'd demo model: ~3% right answers).
Left out: several databases, multi-step lookups across tables, conversational users.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator

from nemotron3.rl.environment import Environment, Task, check_split, split_of
from nemotron3.rl.envs.structured import validator_for

_ITEMS = ["apples", "pears", "figs", "plums", "limes", "dates", "kiwis", "grapes", "melons", "cherries"]
_ITEM = {"type": "string", "description": "item name, e.g. apples"}
_QTY = {"type": "integer", "minimum": 0, "description": "number of units"}


def _tool(name: str, description: str, **properties) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}}}


TOOLS = [
    _tool("list_items", "List every item in the inventory with its quantity."),
    _tool("get_quantity", "Get the quantity of one item.", item=_ITEM),
    _tool("set_quantity", "Set the quantity of an existing item.", item=_ITEM, quantity=_QTY),
    _tool("add_item", "Add a new item with a quantity.", item=_ITEM, quantity=_QTY),
    _tool("remove_item", "Remove an item from the inventory.", item=_ITEM),
]
SYSTEM = ("You manage a shop's inventory database through the tools. Carry out the user's request with tool calls, "
          "then reply with a short confirmation and no tool call.")


def _run(db: dict[str, int], name: str, args: dict) -> dict:
    """Execute one validated call on db (mutated in place); the result the model sees."""
    item = args.get("item")
    if name == "list_items":
        return {"items": dict(sorted(db.items()))}
    if name != "add_item" and item not in db:
        return {"error": f"no item named {item!r}; list_items shows what exists"}
    if name == "get_quantity":
        return {"item": item, "quantity": db[item]}
    if name == "set_quantity":
        db[item] = args["quantity"]
    elif name == "add_item":
        if item in db:
            return {"error": f"{item!r} already exists; use set_quantity"}
        db[item] = args["quantity"]
    else:
        del db[item]
    return {"ok": True}


class ToolsEnv(Environment):
    name = "tools"
    multi_turn = True

    def __init__(self, max_turns: int = 6, max_requests: int = 2):
        self.max_turns, self.max_requests = max_turns, max_requests
        self._validators = {t["function"]["name"]: validator_for(t["function"]["parameters"]) for t in TOOLS}

    def tasks(self, split: str, seed: int) -> Iterator[Task]:
        check_split(split)
        rng = random.Random(seed)
        while True:
            db = {item: rng.randint(0, 20) for item in rng.sample(_ITEMS, 4)}
            target = dict(db)
            requests = []
            for _ in range(rng.randint(1, self.max_requests)):
                kind = rng.randrange(4)
                present = sorted(target)
                absent = sorted(set(_ITEMS) - set(target))
                if kind == 0 and present:
                    item, n = rng.choice(present), rng.randint(0, 30)
                    requests.append(f"Set the quantity of {item} to {n}.")
                    target[item] = n
                elif kind == 1 and absent:
                    item, n = rng.choice(absent), rng.randint(1, 30)
                    requests.append(f"Add {n} {item}.")
                    target[item] = n
                elif kind == 2 and len(present) > 1:
                    item = rng.choice(present)
                    requests.append(f"Remove {item}.")
                    del target[item]
                elif present:                                     # needs a read before the write
                    item, n = rng.choice(present), rng.randint(1, 9)
                    requests.append(f"We received {n} more {item}; update the stock.")
                    target[item] += n
            text = " ".join(requests)
            if split_of(text) != split:
                continue
            yield Task([{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
                       {"db": db, "target": target, "tools": TOOLS})

    def respond(self, task: Task, tool_calls: list[dict]) -> list[dict]:
        replies = []
        for call in tool_calls:
            name = call.get("name") if isinstance(call, dict) else None
            args = call.get("arguments", {}) if isinstance(call, dict) else None
            if isinstance(args, str):                             # OpenAI wire format carries a JSON string
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    args = None
            if name not in self._validators:
                result = {"error": f"unknown tool {name!r}; the tools are {sorted(self._validators)}"}
            elif not isinstance(args, dict) or not self._validators[name].is_valid(args):
                errors = [] if not isinstance(args, dict) else [e.message for e in
                                                                self._validators[name].iter_errors(args)]
                result = {"error": f"bad arguments for {name}: {'; '.join(errors) or 'expected a JSON object'}"}
            else:
                result = _run(task.data["db"], name, args)
            replies.append({"role": "tool", "name": str(name), "content": json.dumps(result)})
        return replies

    def done(self, task: Task, messages: list[dict]) -> bool:
        return episode_over(messages, self.max_turns)

    def score(self, task: Task, completion: str) -> float:
        return float(task.data["db"] == task.data["target"])


def episode_over(messages: list[dict], max_turns: int) -> bool:
    """True once the last assistant turn made no tool call, or after max_turns assistant turns."""
    turns = [m for m in messages if m.get("role") == "assistant"]
    return bool(turns) and (not turns[-1].get("tool_calls") or len(turns) >= max_turns)


_CALC_EXPR = re.compile(r"\d{1,6}(?:[+*-]\d{1,6}){0,3}")   # what calc evaluates: small non-negative integers, + - *


def _calc(expr: str) -> str:
    """The calc tool: the value of an integer expression (* before + and -), or an error text."""
    expr = expr.replace(" ", "")
    if not _CALC_EXPR.fullmatch(expr):
        return "error: calc takes integers joined by + - *, e.g. 37*45"
    total = 0
    for sign, term in re.findall(r"([+-]?)([\d*]+)", expr):       # signed products: "3+4*2-1" -> 3, +4*2, -1
        product = 1
        for factor in term.split("*"):
            product *= int(factor)                                 # int("05") == 5, as a person reads it
        total += -product if sign == "-" else product
    return str(total)


class ShortToolsEnv(Environment):
    """`tools_short`: one tool call in the built-in SFT set's form, then the answer (module docstring)."""
    name = "tools_short"
    multi_turn = True

    def __init__(self, max_turns: int = 3, calc_share: float = 4 / 7):
        if max_turns < 2 or not 0.0 <= calc_share <= 1.0:
            raise ValueError(f"ShortToolsEnv needs max_turns >= 2 (a call, then the answer) and calc_share in "
                             f"[0, 1], got {max_turns}, {calc_share}.")
        self.max_turns, self.calc_share = max_turns, calc_share

    def tasks(self, split: str, seed: int) -> Iterator[Task]:
        from nemotron3.train.sft_data import CALCULATOR, LOOKUP
        check_split(split)
        rng = random.Random(seed)
        while True:
            if rng.random() < self.calc_share:                 # the SFT set's calculator: 2 digits times 2 digits
                a, b = rng.randrange(10, 100), rng.randrange(10, 100)
                question, tool, answer, table = f"{a}*{b}=?", CALCULATOR, str(a * b), {}
            else:                                              # its key lookup: the value only the tool knows
                k, v = rng.randrange(100), rng.randrange(100)
                question, tool, answer, table = f"k{k}?", LOOKUP, f"v{v}", {f"k{k}": f"v{v}"}
            if split_of(question) == split:
                yield Task([{"role": "user", "content": question}],
                           {"tools": [tool], "answer": answer, "table": table})

    def respond(self, task: Task, tool_calls: list[dict]) -> list[dict]:
        replies = []
        for call in tool_calls:
            name = call.get("name") if isinstance(call, dict) else None
            args = call.get("arguments") if isinstance(call, dict) else None
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    args = None
            tool = task.data["tools"][0]["function"]
            (param,) = tool["parameters"]["properties"]
            if name != tool["name"]:
                result = f"error: unknown tool {name!r}; the tool is {tool['name']}"
            elif not isinstance(args, dict) or set(args) != {param} or not isinstance(args[param], (str, int)):
                result = f"error: {name} takes one argument, {param}"
            elif name == "calc":
                result = _calc(str(args[param]))
            else:
                result = task.data["table"].get(str(args[param]), f"error: no key {args[param]!r}")
            task.data["called"] = task.data.get("called", False) or result == task.data["answer"]
            replies.append({"role": "tool", "name": str(name), "content": result})
        return replies

    def done(self, task: Task, messages: list[dict]) -> bool:
        return episode_over(messages, self.max_turns)

    def score(self, task: Task, completion: str) -> dict[str, float]:
        call, answer = float(task.data.get("called", False)), float(completion.strip() == task.data["answer"])
        return {"reward": (call + answer) / 2, "call": call, "answer": answer}
