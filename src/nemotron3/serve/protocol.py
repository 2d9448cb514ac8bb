"""OpenAI request bodies -> engine Requests, with a 400-worthy message for anything malformed.

Chat fields: messages (system/user/assistant/tool, string or text-part content), max_tokens |
max_completion_tokens, temperature, top_p, n, stop, seed, logprobs + top_logprobs, stream + stream_options
{include_usage}, chat_template_kwargs {enable_thinking}, max_thinking_tokens | reasoning_budget; vLLM-style extras
top_k, min_p, repetition_penalty. Completions: prompt (string or token ids) and logprobs as a count. Unknown fields
are ignored, as OpenAI-compatible servers do, so clients that send more still work.
"""

from __future__ import annotations

from ..infer.engine import Request
from ..infer.sampling import SamplingParams

ROLES = ("system", "user", "assistant", "tool", "developer")


class RequestError(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


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


def _common(body, prompt_ids, thinking, context, logprobs):
    """The engine Request for a chat or completion body. Ranges are the engine's to check (SamplingParams and
    Engine.check, the one validation of each argument); here only types, and OpenAI's own limits on n / stop."""
    max_tokens = _num(body, "max_completion_tokens", None, 1, integer=True)
    max_tokens = _num(body, "max_tokens", max_tokens, 1, integer=True)
    if max_tokens is None:
        max_tokens = max(1, min(context - len(prompt_ids), 1024))
    n = _num(body, "n", 1, 1, 16, integer=True)
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
    req = Request(list(prompt_ids), max_tokens, sampling, stop=stop, logprobs=logprobs, thinking=thinking,
                  reasoning_budget=budget if thinking else None, n=n)
    return dict(request=req, stream=stream, include_usage=bool(opts.get("include_usage")), logprobs=logprobs)


def _text(content, i):
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(
            p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    if content is None:
        return ""
    raise RequestError(f"messages[{i}].content must be a string or a list of text parts.", "messages")


def parse_chat(body, tokenizer, context: int) -> dict:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object.")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("'messages' is required: a non-empty list of {role, content} objects.", "messages")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}] must be an object with 'role' and 'content'.", "messages")
        if m.get("role") not in ROLES:
            raise RequestError(f"messages[{i}].role is {m.get('role')!r}; use one of {', '.join(ROLES)}.", "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        clean.append({"role": role, "content": _text(m.get("content"), i)})
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise RequestError("'chat_template_kwargs' must be an object.", "chat_template_kwargs")
    enable = kwargs.get("enable_thinking", True)
    if not isinstance(enable, bool):
        raise RequestError("chat_template_kwargs.enable_thinking must be true or false.", "chat_template_kwargs")
    try:
        prompt = tokenizer.apply_chat_template(clean, add_generation_prompt=True, enable_thinking=enable)
    except ValueError as e:
        raise RequestError(str(e), "messages") from None
    logprobs = body.get("logprobs", False)
    if not isinstance(logprobs, bool):
        raise RequestError("'logprobs' must be true or false (top_logprobs gives the count).", "logprobs")
    top = _num(body, "top_logprobs", 0, 0, 20, integer=True)
    if top and not logprobs:
        raise RequestError("'top_logprobs' needs 'logprobs': true.", "top_logprobs")
    ids = tokenizer.encode(prompt)
    return _common(body, ids, prompt.rstrip().endswith("<think>"), context, top if logprobs else None)


def parse_completion(body, tokenizer, context: int) -> dict:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object.")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("'prompt' is empty.", "prompt")
        ids = tokenizer.encode(prompt)
        thinking = prompt.rstrip().endswith("<think>")
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids, thinking = prompt, False
    else:
        raise RequestError("'prompt' is required: a string or a list of token ids.", "prompt")
    logprobs = _num(body, "logprobs", None, 0, 20, integer=True)
    return _common(body, ids, thinking, context, logprobs)
