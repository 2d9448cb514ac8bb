"""Tool calls in Nemotron 3's format (vLLM's qwen3_coder shape): the model writes

    <tool_call>
    <function=NAME>
    <parameter=ARG>
    value
    </parameter>
    </function>
    </tool_call>

and the tools it may call are listed in the system prompt inside <tools>...</tools>; tool results come back as user
turns wrapped in <tool_response>...</tool_response>. This file owns the request side (validating `tools` /
`tool_choice` / history `tool_calls`, folding them into messages the byte tokenizer's template renders; an HF
tokenizer's Jinja template receives them as they are), and the response side (`parse_tool_calls` for a finished
text, `ToolCallStream` for deltas). It is kept minimal and isolated so that the one parser of the chat-format module
can replace `parse_tool_calls` with the same contract: text -> (content without calls, [{name, arguments: dict}]).
A parameter value is JSON when the tool's schema gives it a non-string type (or, without a schema, when it parses
as JSON), else the raw text.
"""

from __future__ import annotations

import json
import re
import uuid

from ..tokenizer import ByteTokenizer

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_FUNCTION = re.compile(r"<function=([^>\n]+)>\n?(.*?)</function>", re.S)
_PARAM = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.S)


class ToolError(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


# ---- request side ---------------------------------------------------------------------------------------------------
def parse_tools(tools, tool_choice) -> tuple[list[dict], str | dict]:
    """[{name, description, parameters, strict}] and the choice: "none" | "auto" | "required" | {"name": NAME}."""
    if tools is None:
        if tool_choice not in (None, "none", "auto"):
            raise ToolError("'tool_choice' needs 'tools'.", "tool_choice")
        return [], "none"
    if not isinstance(tools, list):
        raise ToolError("'tools' must be a list of {\"type\": \"function\", \"function\": {...}}.", "tools")
    out = []
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise ToolError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}.", "tools")
        params = f.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise ToolError(f"tools[{i}].function.parameters must be a JSON schema object.", "tools")
        out.append({"name": f["name"], "description": f.get("description") or "", "parameters": params,
                    "strict": bool(f.get("strict"))})
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if name not in {t["name"] for t in out}:
            raise ToolError(f"tool_choice names {name!r}, which is not among the tools.", "tool_choice")
        choice = {"name": name}
    elif choice not in ("none", "auto", "required"):
        raise ToolError("'tool_choice' must be none, auto, required or {\"type\": \"function\", \"function\": "
                        "{\"name\": ...}}.", "tool_choice")
    return out, choice


def parse_history_calls(calls, i: int) -> list[dict]:
    """An assistant message's OpenAI tool_calls -> [{id, name, arguments: dict}]."""
    out = []
    for c in calls if isinstance(calls, list) else [None]:
        f = c.get("function") if isinstance(c, dict) else None
        try:
            args = f["arguments"] if isinstance(f["arguments"], dict) else json.loads(f["arguments"] or "{}")
            assert isinstance(f["name"], str) and isinstance(args, dict)
        except (TypeError, KeyError, AssertionError, json.JSONDecodeError):
            raise ToolError(f"messages[{i}].tool_calls must be a list of {{\"id\", \"type\": \"function\", "
                            f"\"function\": {{\"name\", \"arguments\": JSON object string}}}}.", "messages") from None
        out.append({"id": c.get("id"), "name": f["name"], "arguments": args})
    return out


def render_call(call: dict) -> str:
    """One call in the model's XML format (strings raw, other values as JSON)."""
    params = "".join(f"<parameter={k}>\n{v if isinstance(v, str) else json.dumps(v)}\n</parameter>\n"
                     for k, v in call["arguments"].items())
    return f"{CALL_OPEN}\n<function={call['name']}>\n{params}</function>\n{CALL_CLOSE}"


def render_tools(tools: list[dict]) -> str:
    lines = "\n".join(json.dumps({"type": "function", "function": {k: t[k] for k in ("name", "description",
                                                                                      "parameters")}})
                      for t in tools)
    return (f"# Tools\n\nYou may call one or more functions. They are listed inside <tools></tools>:\n<tools>\n{lines}\n"
            f"</tools>\n\nTo call a function, reply with:\n{CALL_OPEN}\n<function=NAME>\n<parameter=ARG>\nvalue\n"
            f"</parameter>\n</function>\n{CALL_CLOSE}")


def render_prompt(tokenizer, messages: list[dict], tools: list[dict], enable_thinking: bool) -> str:
    """The prompt text. The byte template knows only system/user/assistant text, so tools, history calls and tool
    results are folded into those roles in Nemotron 3's format; other templates get tools= and the messages."""
    if not isinstance(tokenizer, ByteTokenizer):
        msgs = [dict(m, tool_calls=[{"id": c["id"], "type": "function",
                                     "function": {"name": c["name"], "arguments": c["arguments"]}}
                                    for c in m["tool_calls"]]) if m.get("tool_calls") else m for m in messages]
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=enable_thinking,
                                             tools=[{"type": "function", "function": t} for t in tools] or None)
    folded = []
    if tools:
        block = render_tools(tools)
        if messages[0]["role"] == "system":
            messages = [{"role": "system", "content": messages[0]["content"] + "\n\n" + block}] + messages[1:]
        else:
            messages = [{"role": "system", "content": block}] + messages
    for m in messages:
        if m["role"] == "tool":
            resp = f"<tool_response>\n{m['content']}\n</tool_response>"
            if folded and folded[-1].get("tool_turn"):          # consecutive results share one user turn
                folded[-1]["content"] += "\n" + resp
            else:
                folded.append({"role": "user", "content": resp, "tool_turn": True})
        elif m.get("tool_calls"):
            calls = "\n".join(render_call(c) for c in m["tool_calls"])
            folded.append({"role": "assistant", "content": (m["content"] + "\n" if m["content"] else "") + calls})
        else:
            folded.append({"role": m["role"], "content": m["content"]})
    return tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in folded],
                                         add_generation_prompt=True, enable_thinking=enable_thinking)


# ---- response side --------------------------------------------------------------------------------------------------
def _value(raw: str, schema: dict | None):
    kind = (schema or {}).get("type")
    if kind == "string":
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _parse_function(block: str, tools: list[dict] | None) -> dict | None:
    m = _FUNCTION.search(block)
    if m is None:
        return None
    name = m.group(1).strip()
    props = next((t["parameters"].get("properties", {}) for t in tools or [] if t["name"] == name), {})
    return {"name": name, "arguments": {p.strip(): _value(v, props.get(p.strip())) for p, v in
                                        _PARAM.findall(m.group(2))}}


def parse_tool_calls(text: str, tools: list[dict] | None = None) -> tuple[str, list[dict]]:
    """(content without the calls, stripped; [{name, arguments: dict}]). A block whose function never closed (the
    output was cut) stays in the content."""
    content, calls, pos = [], [], 0
    while (start := text.find(CALL_OPEN, pos)) >= 0:
        end = text.find(CALL_CLOSE, start)
        call = _parse_function(text[start:end if end >= 0 else len(text)], tools)
        if call is None and end < 0:
            break
        stop = end + len(CALL_CLOSE) if end >= 0 else len(text)
        content.append(text[pos:start] if call is not None else text[pos:stop])     # an unparsable block is text
        calls += [call] if call is not None else []
        pos = stop
    content.append(text[pos:])
    return "".join(content).strip(), calls


def openai_calls(calls: list[dict]) -> list[dict]:
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}} for c in calls]


class ToolCallStream:
    """Content deltas in, (content delta, [tool-call deltas]) out. Text outside <tool_call> blocks flows through
    (a partial opening tag and whitespace that may end the content are held); a block is held until it closes and
    is then sent as two deltas: id + name, then the complete arguments. The pieces join to parse_tool_calls'."""

    def __init__(self, tools: list[dict]):
        self.tools, self.buf, self.index = tools, "", 0
        self.started, self.pending = False, ""

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self.buf += text
        content, deltas = "", []
        while self.buf:
            start = self.buf.find(CALL_OPEN)
            if start < 0:
                keep = next((k for k in range(min(len(self.buf), len(CALL_OPEN) - 1), 0, -1)
                             if CALL_OPEN.startswith(self.buf[-k:])), 0)
                content += self._out(self.buf[:len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep:]
                break
            content += self._out(self.buf[:start])
            end = self.buf.find(CALL_CLOSE, start)
            if end < 0:
                self.buf = self.buf[start:]
                break
            block = self.buf[start:end]
            call = self._call(block)
            deltas += call
            content += "" if call else self._out(block + CALL_CLOSE)
            self.buf = self.buf[end + len(CALL_CLOSE):]
        return content, deltas

    def finish(self) -> tuple[str, list[dict]]:
        rest, self.buf = self.buf, ""
        if rest.startswith(CALL_OPEN) and (d := self._call(rest)):
            return "", d
        return self._out(rest), []

    def _call(self, block: str) -> list[dict]:
        call = _parse_function(block, self.tools)
        if call is None:
            return []
        i, self.index = self.index, self.index + 1
        full = openai_calls([call])[0]
        return [{"index": i, "id": full["id"], "type": "function", "function": {"name": call["name"], "arguments": ""}},
                {"index": i, "function": {"arguments": full["function"]["arguments"]}}]

    def _out(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        text = self.pending + text
        body = text.rstrip()
        self.pending = text[len(body):]
        return body
