"""Tool calls over the OpenAI API, in Nemotron 3's format (chat_format.py owns the format: the template that lists
the tools in <tools>...</tools> and renders history calls and <tool_response> results, and the one parser of

    <tool_call>
    <function=NAME>
    <parameter=ARG>
    value
    </parameter>
    </function>
    </tool_call>

). This file owns the API side: validating `tools` / `tool_choice` / history `tool_calls`, the prompt through the
tokenizer's chat template, OpenAI `tool_calls` from a finished text, and `ToolCallStream` for streamed deltas (as
vLLM's qwen3_coder parser streams them). Markup the parser rejects (a call cut off by max_tokens, text after the
calls) is returned as plain content, never an error for the client.
"""

from __future__ import annotations

import json
import uuid

from ..chat_format import ToolCallError
from ..chat_format import parse_tool_calls as parse_calls

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


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


def render_prompt(tokenizer, messages: list[dict], tools: list[dict], enable_thinking: bool) -> str:
    """The prompt text through the tokenizer's chat template (the byte tokenizer's is Nemotron 3's format; an HF
    checkpoint's Jinja template gets the same OpenAI-shaped messages and tools)."""
    msgs = [dict(m, tool_calls=[{"id": c["id"], "type": "function",
                                 "function": {"name": c["name"], "arguments": c["arguments"]}}
                                for c in m["tool_calls"]]) if m.get("tool_calls") else m for m in messages]
    return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=enable_thinking,
                                         tools=_functions(tools))


def _functions(tools: list[dict] | None) -> list[dict] | None:
    """OpenAI tool entries as the template and the parser take them (our `strict` flag is the server's own)."""
    return [{"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters")}}
            for t in tools or []] or None


# ---- response side --------------------------------------------------------------------------------------------------
def parse_tool_calls(text: str, tools: list[dict] | None = None) -> tuple[str, list[dict]]:
    """(content without the calls, stripped; [{name, arguments: dict}]) by chat_format's parser; text it rejects
    stays content."""
    try:
        content, calls = parse_calls(text, _functions(tools))
    except ToolCallError:
        return text.strip(), []
    return content, [{"name": c.name, "arguments": c.arguments} for c in calls]


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
        _, calls = parse_tool_calls(block + ("" if block.endswith(CALL_CLOSE) else CALL_CLOSE), self.tools)
        if len(calls) != 1:
            return []
        call = calls[0]
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
