r"""Nemotron 3's chat format: message normalisation, the built-in renderer (what byte-level models speak) and the one
tool-call parser (server, RL and evaluation all use it).

The format (Nemotron 3 Nano's chat template; NANO §3.1.1, white paper §2.7):
    <|im_start|>system\n{system}<|im_end|>\n                                         no tools
    <|im_start|>system\n{system}\n\n# Tools\n\nYou have access to the following functions:\n\n<tools>
        \n<function>\n<name>NAME</name>\n<description>...\n<parameters>...</parameters>\n</function>...
    \n</tools><|im_end|>\n                                                          tools (no "\n\n" without a system)
    <|im_start|>user\n{text}<|im_end|>\n
    <|im_start|>assistant\n<think>\n{reasoning}\n</think>\n{answer}<|im_end|>\n         a turn with reasoning
    <|im_start|>assistant\n<think></think>{answer}<|im_end|>\n                           reasoning off
    <|im_start|>assistant\n...\n<tool_call>\n<function=NAME>\n<parameter=ARG>\nvalue\n</parameter>\n
        </function>\n</tool_call>\n<|im_end|>\n                                      a tool-calling turn
    <|im_start|>user\n<tool_response>\n{result}\n</tool_response>\n<|im_end|>\n     tool results (one turn for a run)
The system turn is always present (empty without a system message). The generation prompt is
"<|im_start|>assistant\n<think>\n" (enable_thinking=True) or "<|im_start|>assistant\n<think></think>" (False).
truncate_history_thinking (default True) replaces the reasoning of assistant turns before the last user message by
"<think></think>"; turns of the current tool loop keep theirs. Whitespace quirks follow NVIDIA's template exactly
(an earlier plain answer keeps the newline after "</think>", an earlier tool-calling turn does not).

Differs from NVIDIA's template on purpose: the ~780-character reminder of the call format that the template appends
after "</tools>" is left out (a byte-level model pays one token per character; the demo model never sees it), and
the data-prep-only "{thinking token budget: N}" hint is not supported. Checkpoints with their own Jinja template
are rendered by that template (tokenizer.HFTokenizer), not by this file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
END_OF_TURN = IM_END
FORCED_THINK_CLOSE = ".\n</think>\n\n"          # what the inference engine forces when a reasoning budget runs out
ROLES = ("system", "user", "assistant", "tool")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")   # function and parameter names the XML call format can carry


def generation_prompt(enable_thinking: bool = True) -> str:
    """What a prompt ends with when the model is to answer: the assistant header and the opened (or empty) thought."""
    return f"{IM_START}assistant\n" + ("<think>\n" if enable_thinking else "<think></think>")


# ---- normalisation (shared by the SFT loader and the server) ----
def normalize_messages(messages, tools=None, require_assistant: bool = True) -> tuple[list[dict], list[dict] | None]:
    """Check an OpenAI-style conversation and return it in the form the renderer takes: assistant reasoning in
    `reasoning_content` (an inline "<think>...</think>" is split off), tool calls as {"name", "arguments": dict}
    (a JSON-string `arguments` is decoded), tools as their bare function schemas. Raises ValueError naming the
    field (messages[2].tool_calls[0].function.name, ...) and the fix. A prompt (require_assistant=False) may
    have no assistant turn yet; training data must."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: must be a non-empty list of {role, content} objects.")
    out, pending_calls = [], False
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{where}: must be an object with 'role' and 'content', got {type(m).__name__}.")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}.role: unknown role {role!r}; use one of {', '.join(ROLES)}.")
        if role in ("assistant", "tool") and all(o["role"] == "system" for o in out):
            raise ValueError(f"{where}: the first turn (after an optional system message) must be the user's, "
                             f"not {role!r}.")
        content = m.get("content")
        if role == "assistant":
            out.append(_normalize_assistant(m, where))
            pending_calls = bool(out[-1].get("tool_calls"))
            continue
        if not isinstance(content, str):
            raise ValueError(f"{where}.content: must be a string, got {type(content).__name__}.")
        if role == "tool" and not pending_calls:
            raise ValueError(f"{where}: a tool result must follow an assistant turn with tool_calls (or another "
                             f"tool result).")
        if role == "system" and i > 0:
            raise ValueError(f"{where}: a system message may only come first.")
        pending_calls = pending_calls and role == "tool"
        out.append({"role": role, "content": content})
    if require_assistant and not any(m["role"] == "assistant" for m in out):
        raise ValueError("messages: assistant turn missing; a conversation needs at least one assistant message.")
    return out, normalize_tools(tools)


def _normalize_assistant(m: dict, where: str) -> dict:
    content, reasoning, calls = m.get("content"), m.get("reasoning_content"), m.get("tool_calls")
    if content is None and calls:
        content = ""
    if not isinstance(content, str):
        raise ValueError(f"{where}.content: must be a string (or null with tool_calls), got {type(content).__name__}.")
    if reasoning is not None and not isinstance(reasoning, str):
        raise ValueError(f"{where}.reasoning_content: must be a string, got {type(reasoning).__name__}.")
    if THINK_OPEN in content or THINK_CLOSE in content:
        head, sep, tail = content.partition(THINK_CLOSE)
        if not sep or not head.lstrip().startswith(THINK_OPEN) or THINK_OPEN in tail or THINK_CLOSE in tail:
            raise ValueError(f"{where}.content: malformed reasoning; write one leading '<think>...</think>' or put "
                             f"the reasoning in 'reasoning_content'.")
        if reasoning is not None:
            raise ValueError(f"{where}: reasoning given twice (reasoning_content and an inline <think>); keep one.")
        reasoning, content = head.lstrip()[len(THINK_OPEN):].strip(), tail.lstrip("\n")
    if reasoning is not None and (THINK_OPEN in reasoning or THINK_CLOSE in reasoning):
        raise ValueError(f"{where}.reasoning_content: must not contain <think> or </think> tags.")
    out = {"role": "assistant", "content": content}
    if reasoning and reasoning.strip():
        out["reasoning_content"] = reasoning
    if calls is not None:
        if not isinstance(calls, list):
            raise ValueError(f"{where}.tool_calls: must be a list, got {type(calls).__name__}.")
        out["tool_calls"] = [_normalize_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
    return out


def _normalize_call(call, where: str) -> dict:
    if not isinstance(call, dict):
        raise ValueError(f"{where}: a tool call must be an object, got {type(call).__name__}.")
    if "function" in call:
        call, where = call["function"], where + ".function"
        if not isinstance(call, dict):
            raise ValueError(f"{where}: must be an object with 'name' and 'arguments'.")
    name, args = call.get("name"), call.get("arguments", {})
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{where}.name: {name!r} is not a function name (letters, digits, _ . -).")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}.arguments: invalid JSON ({e.msg}).") from None
    if not isinstance(args, dict):
        raise ValueError(f"{where}.arguments: must be an object of named arguments, got {type(args).__name__}.")
    for k in args:
        if not _NAME.fullmatch(k):
            raise ValueError(f"{where}.arguments: {k!r} is not a parameter name (letters, digits, _ . -).")
    return {"name": name, "arguments": args}


def normalize_tools(tools) -> list[dict] | None:
    """OpenAI {"type": "function", "function": {...}} entries or bare schemas -> bare schemas with a name."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise ValueError(f"tools: must be a list of function schemas, got {type(tools).__name__}.")
    out = []
    for i, t in enumerate(tools):
        t = t.get("function", t) if isinstance(t, dict) else t
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not _NAME.fullmatch(t["name"]):
            raise ValueError(f"tools[{i}]: must be an object with a function 'name' (letters, digits, _ . -).")
        out.append(t)
    return out or None


# ---- rendering ----
def render_chat(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False,
                enable_thinking: bool = True, truncate_history_thinking: bool = True) -> str:
    """The conversation as Nemotron 3 text (module docstring). Takes normalised messages (normalize_messages)."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    last_user = max((i for i, m in enumerate(turns) if m["role"] == "user"), default=-1)
    out = [f"{IM_START}system\n{system}"]
    if tools:
        out.append(("\n\n" if system else "") + "# Tools\n\nYou have access to the following functions:\n\n<tools>")
        out += [_render_tool(t.get("function", t)) for t in tools]
        out.append("\n</tools>")
    out.append(f"{IM_END}\n")
    for i, m in enumerate(turns):
        role = m["role"]
        if role == "assistant":
            out.append(_render_assistant(m, history=truncate_history_thinking and i < last_user))
        elif role == "tool":
            if i > 0 and turns[i - 1]["role"] != "tool":
                out.append(f"{IM_START}user\n")
            out.append(f"<tool_response>\n{m['content']}\n</tool_response>\n")
            if i == len(turns) - 1 or turns[i + 1]["role"] != "tool":
                out.append(f"{IM_END}\n")
        else:
            out.append(f"{IM_START}{role}\n{m['content']}{IM_END}\n")
    if add_generation_prompt:
        out.append(generation_prompt(enable_thinking))
    return "".join(out)


def _render_assistant(m: dict, history: bool) -> str:
    reasoning, content = m.get("reasoning_content"), m.get("content") or ""
    if isinstance(reasoning, str) and reasoning.strip():
        content = f"<think>\n{reasoning}\n</think>\n{content}"
    elif THINK_OPEN not in content and THINK_CLOSE not in content:
        content = "<think></think>" + content
    head = f"{IM_START}assistant\n"
    if m.get("tool_calls"):
        if not history:
            body = content.strip() + "\n"
        else:                                   # earlier tool-calling turn: its thought goes, no newline kept
            c = content.split(THINK_CLOSE)[-1] if THINK_CLOSE in content else content.split(THINK_OPEN)[0]
            body = "<think></think>" + c.strip() + "\n"
        return head + body + "".join(render_tool_call(c) for c in m["tool_calls"]) + f"{IM_END}\n"
    if history and THINK_OPEN in content and THINK_CLOSE in content:
        content = "<think></think>" + content.split(THINK_CLOSE)[-1]   # earlier answer: "\n" after </think> stays
    return head + content.strip() + f"{IM_END}\n"


def render_tool_call(call: dict) -> str:
    """<tool_call>\\n<function=NAME>\\n(<parameter=ARG>\\nvalue\\n</parameter>\\n)*</function>\\n</tool_call>\\n;
    objects and lists are written as JSON, everything else as str(value)."""
    call = call.get("function", call)
    params = "".join(f"<parameter={k}>\n{_value_text(v)}\n</parameter>\n" for k, v in call.get("arguments", {}).items())
    return f"<tool_call>\n<function={call['name']}>\n{params}</function>\n</tool_call>\n"


def _value_text(v) -> str:
    return json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list, tuple)) else str(v)


def _render_tool(t: dict) -> str:
    out = [f"\n<function>\n<name>{t['name']}</name>"]
    if "description" in t:
        out.append(f"\n<description>{str(t['description']).strip()}</description>")
    out.append("\n<parameters>")
    params = t.get("parameters")
    if isinstance(params, dict) and isinstance(params.get("properties"), dict):
        for name, spec in params["properties"].items():
            out.append(f"\n<parameter>\n<name>{name}</name>")
            if isinstance(spec, dict):
                if "type" in spec:
                    out.append(f"\n<type>{spec['type']}</type>")
                if "description" in spec:
                    out.append(f"\n<description>{str(spec['description']).strip()}</description>")
                if "enum" in spec:
                    out.append(f"\n<enum>{json.dumps(spec['enum'], ensure_ascii=False)}</enum>")
            out.append(_extra_keys(spec, ("name", "type", "description", "enum")) + "\n</parameter>")
    out.append(_extra_keys(params, ("type", "properties", "required")))
    if isinstance(params, dict) and "required" in params:
        out.append(f"\n<required>{json.dumps(params['required'], ensure_ascii=False)}</required>")
    out.append("\n</parameters>" + _extra_keys(t, ("type", "name", "description", "parameters")) + "\n</function>")
    return "".join(out)


def _extra_keys(d, handled) -> str:
    """Schema keys the template has no slot for, as <key>value</key> (objects and lists as JSON)."""
    if not isinstance(d, dict):
        return ""
    return "".join(f"\n<{k}>{_value_text(v)}</{k}>" for k, v in d.items() if k not in handled)


# ---- parsing ----
class ToolCallError(ValueError):
    """Tool-call markup that does not follow the format; the message says where."""


@dataclass
class ToolCall:
    name: str
    arguments: dict = field(default_factory=dict)

    def to_openai(self, call_id: str) -> dict:
        return {"id": call_id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>\n?(.*?)</function>\s*", re.S)
_PARAM = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>\s*", re.S)


def parse_tool_calls(content: str, tools: list[dict] | None = None) -> tuple[str, list[ToolCall]]:
    """Split an assistant answer (reasoning already removed) into its text (what precedes the first call) and its
    tool calls. Parameter values are converted by the tool's JSON-schema type when `tools` declares it (integer,
    number, boolean, object, array) and stay strings otherwise. Raises ToolCallError when a call is not closed, is
    not '<function=NAME>' with '<parameter=ARG>' blocks, has a value that does not fit its declared type, or is
    followed by text (the format allows text before the calls only)."""
    schemas = {t["name"]: t for t in (normalize_tools(tools) or [])}
    first = content.find("<tool_call>")
    if first < 0:
        if "</tool_call>" in content:
            raise ToolCallError("'</tool_call>' without an opening '<tool_call>'.")
        return content.strip(), []
    calls, pos = [], first
    while pos < len(content):
        end = content.find("</tool_call>", pos)
        body = content[pos + len("<tool_call>"):end]
        if end < 0 or "<tool_call>" in body:
            raise ToolCallError(f"tool call {len(calls)}: '<tool_call>' without a matching '</tool_call>'.")
        calls.append(_parse_call(body, schemas, len(calls)))
        rest = content[end + len("</tool_call>"):]
        pos = len(content) - len(rest.lstrip())
        if pos < len(content) and not content.startswith("<tool_call>", pos):
            raise ToolCallError(f"text after tool call {len(calls) - 1}: {content[pos:pos + 40]!r}; the format "
                                f"allows text before the calls only.")
    return content[:first].strip(), calls


def _parse_call(body: str, schemas: dict, index: int) -> ToolCall:
    m = _FUNCTION.fullmatch(body)
    if not m:
        raise ToolCallError(f"tool call {index}: expected '<function=NAME>' ... '</function>' inside <tool_call>.")
    name, inner = m.group(1).strip(), m.group(2)
    if not _NAME.fullmatch(name):
        raise ToolCallError(f"tool call {index}: {name!r} is not a function name.")
    props = (schemas.get(name, {}).get("parameters") or {}).get("properties") or {}
    args, pos = {}, 0
    for p in _PARAM.finditer(inner):
        if inner[pos:p.start()].strip():
            break
        key = p.group(1).strip()
        args[key] = _convert(p.group(2), (props.get(key) or {}).get("type"), f"tool call {index} ({name}).{key}")
        pos = p.end()
    if inner[pos:].strip():
        raise ToolCallError(f"tool call {index} ({name}): unexpected text {inner[pos:pos + 40].strip()!r}; each "
                            f"argument must be '<parameter=ARG>\\nvalue\\n</parameter>'.")
    return ToolCall(name, args)


def _convert(text: str, kind, where: str):
    if kind in (None, "string") or isinstance(kind, list):
        return text
    try:
        if kind == "integer":
            return int(text.strip())
        if kind == "number":
            v = float(text.strip())
            return int(v) if v.is_integer() and re.fullmatch(r"-?\d+", text.strip()) else v
        if kind == "boolean":
            low = text.strip().lower()
            if low not in ("true", "false"):
                raise ValueError
            return low == "true"
        if kind in ("object", "array"):
            v = json.loads(text)
            if not isinstance(v, dict if kind == "object" else list):
                raise ValueError
            return v
    except ValueError:
        raise ToolCallError(f"{where}: {text!r} is not a valid {kind}.") from None
    return text
