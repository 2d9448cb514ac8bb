"""OpenAI request bodies -> engine Requests, with a 400-worthy message for anything malformed or too large.

Chat fields: messages (system/developer/user/assistant with tool_calls/tool, string or text-part content),
max_tokens | max_completion_tokens, temperature, top_p, n, stop, seed, logprobs + top_logprobs, stream +
stream_options {include_usage}, tools + tool_choice (none / auto / required / {"type": "function", ...}),
response_format (text / json_object / json_schema), chat_template_kwargs {enable_thinking}, max_thinking_tokens |
reasoning_budget; vLLM's extras top_k, min_p, repetition_penalty, ignore_eos. Completions: prompt as a string, a list of
strings, token ids or a list of token-id lists (one engine request each), echo, logprobs as a count, max_tokens=0
with echo (scoring only). Unknown fields are ignored, as OpenAI-compatible servers do.

Limits (each a 400 naming the limit): n <= max_n, and (prompts x n x max_tokens) <= max_request_tokens, so one
request cannot ask for unbounded work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..infer.engine import Request
from ..infer.sampling import SamplingParams
from . import tools as tool_format

ROLES = ("system", "user", "assistant", "tool", "developer")


class RequestError(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class Limits:
    max_n: int = 16
    """Samples per request (OpenAI's n)."""
    max_request_tokens: int = 65536
    """prompts x n x max_tokens: the most output tokens one HTTP request may ask for."""


@dataclass
class Parsed:
    requests: list[Request]
    """One engine request per prompt (completions may carry several)."""
    prompts: list[list[int]]
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None
    echo: bool = False
    generate: bool = True
    """False for max_tokens=0 with echo: the prompts are scored, nothing is generated."""
    tools: list[dict] = field(default_factory=list)
    """The tool definitions (function objects) whose calls the output is parsed for; empty = no parsing."""
    response_format: dict | None = None
    tool_choice: str | dict = "auto"


def _num(body, name, default, lo=None, hi=None, integer=False):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise RequestError(f"'{name}' must be {'an integer' if integer else 'a number'}, got {v!r}.", name)
    if lo is not None and v < lo:
        raise RequestError(f"'{name}' must be >= {lo}, got {v}.", name)
    if hi is not None and v > hi:
        raise RequestError(f"'{name}' must be <= {hi}, got {v}.", name)
    return v


def _common(body, prompts, thinking, context, logprobs, limits: Limits, allow_zero=False) -> Parsed:
    """Engine Requests for a chat or completion body. Sampling ranges are the engine's to check (SamplingParams and
    Engine.check, the one validation of each argument); here types, OpenAI's own limits and the work limits."""
    max_tokens = _num(body, "max_completion_tokens", None, 1, integer=True)
    max_tokens = _num(body, "max_tokens", max_tokens, 0 if allow_zero else 1, integer=True)
    if max_tokens is None:
        max_tokens = max(1, min(context - max(len(p) for p in prompts), 1024))
    n = _num(body, "n", 1, 1, limits.max_n, integer=True)
    asked = len(prompts) * n * max_tokens
    if asked > limits.max_request_tokens:
        raise RequestError(f"this request asks for up to {asked} output tokens ({len(prompts)} prompts x n={n} x "
                           f"max_tokens={max_tokens}); the server allows {limits.max_request_tokens} per request "
                           f"(--max-request-tokens). Lower n or max_tokens, or split the request.", "max_tokens")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)) or len(stop) > 8:
        raise RequestError("'stop' must be a non-empty string or a list of up to 8 of them.", "stop")
    top_k = _num(body, "top_k", 0, integer=True)
    values = dict(temperature=_num(body, "temperature", 1.0), top_k=0 if top_k == -1 else top_k,
                  top_p=_num(body, "top_p", 1.0), min_p=_num(body, "min_p", 0.0),
                  repetition_penalty=_num(body, "repetition_penalty", 1.0), seed=_num(body, "seed", None, integer=True))
    try:
        sampling = SamplingParams(**values)
    except ValueError as e:                                   # the message starts with the field's name
        raise RequestError(str(e), str(e).split("=", 1)[0]) from None
    budget = _num(body, "max_thinking_tokens", None, 0, integer=True)
    budget = _num(body, "reasoning_budget", budget, 0, integer=True)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be true or false.", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise RequestError("'stream_options' must be an object.", "stream_options")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise RequestError("'ignore_eos' must be true or false.", "ignore_eos")
    reqs = [Request(list(p), max(max_tokens, 1), sampling, stop=stop, logprobs=logprobs, thinking=thinking,
                    reasoning_budget=budget if thinking else None, n=n, ignore_eos=ignore_eos) for p in prompts]
    return Parsed(reqs, [list(p) for p in prompts], stream, bool(opts.get("include_usage")), logprobs,
                  generate=max_tokens > 0)


def _text(content, i):
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in ("text", "input_text",
                                                                                   "output_text")
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    if content is None:
        return ""
    raise RequestError(f"messages[{i}].content must be a string or a list of text parts.", "messages")


def parse_messages(msgs) -> list[dict]:
    """Validated chat messages: {role, content} plus assistant `tool_calls` ({name, arguments: dict}) and a tool
    message's `tool_call_id` / `name`."""
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("'messages' is required: a non-empty list of {role, content} objects.", "messages")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}] must be an object with 'role' and 'content'.", "messages")
        if m.get("role") not in ROLES:
            raise RequestError(f"messages[{i}].role is {m.get('role')!r}; use one of {', '.join(ROLES)}.", "messages")
        msg = {"role": "system" if m["role"] == "developer" else m["role"], "content": _text(m.get("content"), i)}
        if m["role"] == "assistant" and m.get("tool_calls"):
            msg["tool_calls"] = tool_format.parse_history_calls(m["tool_calls"], i)
        if m["role"] == "tool":
            msg["tool_call_id"] = m.get("tool_call_id")
        clean.append(msg)
    return clean


def parse_chat(body, tokenizer, context: int, limits: Limits = Limits()) -> Parsed:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object.")
    messages = parse_messages(body.get("messages"))
    tools, choice = tool_format.parse_tools(body.get("tools"), body.get("tool_choice"))
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise RequestError("'chat_template_kwargs' must be an object.", "chat_template_kwargs")
    enable = kwargs.get("enable_thinking", True)
    if not isinstance(enable, bool):
        raise RequestError("chat_template_kwargs.enable_thinking must be true or false.", "chat_template_kwargs")
    rendered = tools if choice != "none" else []
    try:
        prompt = tool_format.render_prompt(tokenizer, messages, rendered, enable)
    except ValueError as e:
        raise RequestError(str(e), "messages") from None
    logprobs = body.get("logprobs", False)
    if not isinstance(logprobs, bool):
        raise RequestError("'logprobs' must be true or false (top_logprobs gives the count).", "logprobs")
    top = _num(body, "top_logprobs", 0, 0, 20, integer=True)
    if top and not logprobs:
        raise RequestError("'top_logprobs' needs 'logprobs': true.", "top_logprobs")
    ids = tokenizer.encode(prompt)
    out = _common(body, [ids], prompt.rstrip().endswith("<think>"), context, top if logprobs else None, limits)
    if getattr(tokenizer, "end_of_turn", None):         # the template's turn end is text: stop there
        for r in out.requests:
            r.stop = [*r.stop, tokenizer.end_of_turn]
    out.tools, out.tool_choice = rendered, choice
    out.response_format = parse_response_format(body.get("response_format"))
    return out


def parse_response_format(rf) -> dict | None:
    """None for free text, else {"type": "json_object"} or {"type": "json_schema", "schema": {...}}."""
    if rf is None:
        return None
    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise RequestError("'response_format' must be {\"type\": \"text\" | \"json_object\" | \"json_schema\"}.",
                           "response_format")
    if rf["type"] == "text":
        return None
    if rf["type"] == "json_object":
        return {"type": "json_object"}
    spec = rf.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise RequestError("response_format json_schema needs 'json_schema': {\"name\": ..., \"schema\": {...}}.",
                           "response_format")
    schema = spec.get("schema") or {}
    return {"type": "json_schema", "schema": _closed(schema) if spec.get("strict") else schema}


def _closed(schema):
    """OpenAI's strict mode: an object takes no properties beyond those it lists (additionalProperties false)."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if out.get("type") == "object" and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _is_ids(x) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def parse_completion(body, tokenizer, context: int, limits: Limits = Limits()) -> Parsed:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object.")
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _is_ids(prompt):
        prompt = [prompt]
    ok = isinstance(prompt, list) and prompt and all((isinstance(p, str) and p) or _is_ids(p) for p in prompt)
    if not ok:
        raise RequestError("'prompt' is required: a non-empty string, a list of strings, a list of token ids, or a "
                           "list of token-id lists.", "prompt")
    ids = [tokenizer.encode(p) if isinstance(p, str) else p for p in prompt]
    thinking = all(isinstance(p, str) and p.rstrip().endswith("<think>") for p in prompt)
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise RequestError("'echo' must be true or false.", "echo")
    logprobs = _num(body, "logprobs", None, 0, 20, integer=True)
    out = _common(body, ids, thinking, context, logprobs, limits, allow_zero=echo)
    out.echo = echo
    if body.get("stream") and not out.generate:
        raise RequestError("max_tokens=0 (scoring only) cannot be streamed; send stream=false.", "stream")
    return out
