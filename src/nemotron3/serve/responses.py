"""/v1/responses: OpenAI's Responses API over the same engine path as chat completions.

A request is translated into a chat body (instructions -> system message; input items: messages, `function_call`
-> an assistant tool call, `function_call_output` -> a tool message, `reasoning` items dropped as Nemotron 3's
template drops earlier turns' thinking; flat function tools -> chat tools; text.format -> response_format;
max_output_tokens -> max_tokens; reasoning.effort "none" -> enable_thinking false) and parsed by protocol.parse_chat,
so validation, limits, tools and grammars are the chat path's. The output is a list of items: a `reasoning` item
(the thought, as reasoning_text content), a `message` item (output_text), and one `function_call` item per call.
Streaming sends the Responses event sequence (response.created, output_item.added, content_part.added,
output_text.delta / reasoning_text.delta, ... , response.completed). Leaves out: stored responses
(previous_response_id, store), background mode, built-in tools.
"""

from __future__ import annotations

import json
import time
import uuid

from fastapi import Request as HTTPRequest
from fastapi.responses import Response, StreamingResponse

from ..infer import ReasoningStream


def to_chat(body) -> dict:
    """The chat-completions body equivalent to a Responses body (ValueError naming the field if malformed)."""
    from .app import HTTPError
    if not isinstance(body, dict):
        raise HTTPError(400, "the request body must be a JSON object.")
    inp = body.get("input")
    items = [{"role": "user", "content": inp}] if isinstance(inp, str) else inp
    if not isinstance(items, list) or not items:
        raise HTTPError(400, "'input' is required: a string or a list of input items.", param="input")
    messages = [{"role": "system", "content": body["instructions"]}] if body.get("instructions") else []
    for i, it in enumerate(items):
        if not isinstance(it, dict):
            raise HTTPError(400, f"input[{i}] must be an object.", param="input")
        kind = it.get("type", "message")
        if kind == "message":
            messages.append({"role": it.get("role"), "content": it.get("content")})
        elif kind == "function_call":
            call = {"id": it.get("call_id"), "type": "function",
                    "function": {"name": it.get("name"), "arguments": it.get("arguments")}}
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls") is not None:
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            out = it.get("output")
            messages.append({"role": "tool", "tool_call_id": it.get("call_id"),
                             "content": out if isinstance(out, str) else json.dumps(out)})
        elif kind != "reasoning":
            raise HTTPError(400, f"input[{i}].type {kind!r} is not supported; use message, function_call, "
                                 f"function_call_output or reasoning.", param="input")
    chat = {"messages": messages, "stream": body.get("stream", False)}
    for src, dst in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p"),
                     ("seed", "seed"), ("top_logprobs", "top_logprobs")):
        if body.get(src) is not None:
            chat[dst] = body[src]
    if body.get("tools"):
        chat["tools"] = [{"type": "function", "function": {k: t.get(k) for k in ("name", "description", "parameters",
                                                                                  "strict") if k in t}}
                         if isinstance(t, dict) and t.get("type") == "function" else t for t in body["tools"]]
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    if choice is not None:
        chat["tool_choice"] = choice
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.get("name"), "schema": fmt.get("schema"), "strict": fmt.get("strict")}}
    elif isinstance(fmt, dict):
        chat["response_format"] = {"type": fmt.get("type")}
    effort = (body.get("reasoning") or {}).get("effort") if isinstance(body.get("reasoning"), dict) else None
    chat["chat_template_kwargs"] = {"enable_thinking": effort != "none"}
    return chat


def _items(reasoning: str | None, content: str | None, calls: list[dict], status: str, ids=None) -> list[dict]:
    """Output items; ids: {"reasoning": id, "message": id} already announced by a stream."""
    ids, out = ids or {}, []
    if reasoning:
        out.append({"type": "reasoning", "id": ids.get("reasoning") or f"rs_{uuid.uuid4().hex[:24]}", "summary": [],
                    "content": [{"type": "reasoning_text", "text": reasoning}], "status": status})
    if content:
        out.append({"type": "message", "id": ids.get("message") or f"msg_{uuid.uuid4().hex[:24]}", "role": "assistant",
                    "status": status,
                    "content": [{"type": "output_text", "text": content, "annotations": [], "logprobs": []}]})
    for c in calls:
        out.append({"type": "function_call", "id": f"fc_{uuid.uuid4().hex[:24]}", "call_id": c["id"],
                    "name": c["function"]["name"], "arguments": c["function"]["arguments"], "status": "completed"})
    return out


def _response(state, rid, body, output, status, usage) -> dict:
    return {"id": rid, "object": "response", "created_at": int(time.time()), "status": status, "model": state.name,
            "output": output, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "parallel_tool_calls": True, "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools", []),
            "temperature": body.get("temperature"), "top_p": body.get("top_p"), "text": body.get("text"),
            "usage": usage}


def add_routes(app, state):
    from .app import Run, chat_message, read_json, validated
    from .protocol import parse_chat

    @app.post("/v1/responses")
    async def responses(request: HTTPRequest):
        state.metrics["requests"] += 1
        body = await read_json(request)
        parsed = validated(state, parse_chat, to_chat(body))
        run = Run(state, request, parsed)
        await run.submit()
        rid = f"resp_{uuid.uuid4().hex[:24]}"
        if parsed.stream:
            from .app import _guarded
            return StreamingResponse(_guarded(run, _stream(state, run, rid, body)), media_type="text/event-stream")
        results = await run.finished()
        if results is None:
            return Response(status_code=499)
        res = results[0][0]
        msg, finish = chat_message(res, parsed)
        status = "incomplete" if finish == "length" else "completed"
        p, c = len(parsed.prompts[0]), len(res.token_ids)
        return _response(state, rid, body, _items(res.reasoning, msg.get("content"), msg.get("tool_calls", []), status),
                         status, {"input_tokens": p, "output_tokens": c, "total_tokens": p + c})


async def _stream(state, run, rid, body):
    from .app import ERROR_TYPES
    from .tools import ToolCallStream
    parsed, seq = run.parsed, iter(range(1 << 30))

    def event(kind, **fields):
        return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': next(seq), **fields})}\n\n".encode()

    yield event("response.created", response=_response(state, rid, body, [], "in_progress", None))
    split = ReasoningStream(parsed.requests[0].thinking)
    calls = ToolCallStream(parsed.tools) if parsed.tools else None
    open_items: dict[str, tuple[int, str]] = {}                     # "reasoning" | "message" -> (index, item id)
    texts = {"reasoning": "", "message": ""}
    made: list[dict] = []

    def ensure(kind):
        if kind in open_items:
            return []
        idx, iid = len(open_items) + len(made), f"{'rs' if kind == 'reasoning' else 'msg'}_{uuid.uuid4().hex[:24]}"
        open_items[kind] = (idx, iid)
        item = ({"type": "reasoning", "id": iid, "summary": [], "content": []} if kind == "reasoning" else
                {"type": "message", "id": iid, "role": "assistant", "status": "in_progress", "content": []})
        part = {"type": "reasoning_text" if kind == "reasoning" else "output_text", "text": ""}
        if kind == "message":
            part["annotations"] = []
        return [event("response.output_item.added", output_index=idx, item=item),
                event("response.content_part.added", item_id=iid, output_index=idx, content_index=0, part=part)]

    def delta(kind, text):
        out = ensure(kind)
        idx, iid = open_items[kind]
        texts[kind] += text
        name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        return out + [event(name, item_id=iid, output_index=idx, content_index=0, delta=text)]

    finish, completion = "stop", 0
    while True:
        _, kind, val = await run.events.get()
        if kind == "error":
            yield event("error", code=str(val[0]), message=val[1], param=None)
            yield event("response.failed", response=_response(state, rid, body, [], "failed", None)
                        | {"error": {"code": ERROR_TYPES.get(val[0], "server_error"), "message": val[1]}})
            return
        reasoning, content = split.feed(val.text) if kind == "token" else split.finish()
        deltas = []
        if calls is not None:
            content, deltas = calls.feed(content)
            if kind == "done":
                more, last = calls.finish()
                content, deltas = content + more, deltas + last
        for ev in (delta("reasoning", reasoning) if reasoning else []) + (delta("message", content) if content else []):
            yield ev
        for d in deltas:
            if "id" in d:
                made.append({"id": d["id"], "function": {"name": d["function"]["name"], "arguments": ""}})
            else:
                made[-1]["function"]["arguments"] += d["function"]["arguments"]
        if kind == "done":
            finish, completion = val.finish_reason, len(val.token_ids)
            run.jobs[0].remaining -= 1
            break
    status = "incomplete" if finish == "length" else "completed"
    for kind, (idx, iid) in sorted(open_items.items(), key=lambda kv: kv[1][0]):
        part = "reasoning_text" if kind == "reasoning" else "output_text"
        if kind == "message":
            yield event("response.output_text.done", item_id=iid, output_index=idx, content_index=0,
                        text=texts[kind])
        yield event("response.content_part.done", item_id=iid, output_index=idx, content_index=0,
                    part={"type": part, "text": texts[kind]} | ({"annotations": []} if kind == "message" else {}))
    output = _items(texts["reasoning"] or None, texts["message"] or None, made, status,
                    {k: iid for k, (_, iid) in open_items.items()})
    for i, item in enumerate(output):
        yield event("response.output_item.done", output_index=i, item=item)
    p = len(parsed.prompts[0])
    yield event("response.completed", response=_response(
        state, rid, body, output, status, {"input_tokens": p, "output_tokens": completion,
                                           "total_tokens": p + completion}))
