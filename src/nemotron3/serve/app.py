"""The HTTP routes (FastAPI on uvicorn, asyncio, server-sent events): /v1/chat/completions, /v1/completions,
/v1/responses, /v1/models, /tokenize, /detokenize, /tokenizer_info (vLLM's routes, which lm-eval's remote tokenizer
asks for), /health, /metrics.

A route parses its body (protocol.py), submits one job per prompt to the scheduler thread and awaits the job's
events on an asyncio queue, so no connection holds a thread and HTTP handling never blocks the engine. A client
that goes away cancels its jobs, streaming or not (a watcher task waits for http.disconnect). Errors use OpenAI's
body {"error": {"message", "type", "param", "code"}}: 400 invalid, 401 key, 404 route, 408 slow body, 413 body too
large, 429 queue full, 503 waited too long or shutting down, 500 only for a failure of this request's own rows.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..infer import ReasoningStream
from ..infer.scoring import score_prompt
from .guard import error_body
from .protocol import Parsed, parse_chat, parse_completion, parse_messages
from .scheduler import Job
from . import tools as tool_format
from .tools import ToolCallStream, openai_calls, parse_tool_calls


class HTTPError(Exception):
    def __init__(self, status: int, message: str, etype: str = "invalid_request_error", param=None):
        super().__init__(message)
        self.status, self.message, self.etype, self.param = status, message, etype, param


def _error_response(e: HTTPError) -> Response:
    return Response(error_body(e.status, e.message, e.etype, e.param), e.status, media_type="application/json")


ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error", 500: "server_error",
               503: "service_unavailable"}


async def read_json(request: HTTPRequest):
    raw = await request.body()
    try:
        return json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPError(400, f"malformed JSON: {e}") from None
    except RecursionError:
        raise HTTPError(400, "the JSON body is nested too deeply.") from None


def validated(state, parse, body) -> Parsed:
    try:
        parsed = parse(body, state.tokenizer, state.engine.max_model_len, state.limits)
        for r in parsed.requests:
            state.engine.check(r)
        forced_calls = parsed.tools and (parsed.tool_choice not in ("auto", "none") or any(
            t["strict"] for t in parsed.tools))
        if parsed.response_format is not None or forced_calls:
            state.constrain(parsed)
    except ValueError as e:
        state.metrics["errors"] += 1
        raise HTTPError(400, str(e), param=getattr(e, "param", None)) from None
    return parsed


class Run:
    """An HTTP request's jobs on the scheduler: submit, events, cancel on disconnect or when abandoned."""

    def __init__(self, state, http: HTTPRequest, parsed: Parsed):
        self.state, self.http, self.parsed = state, http, parsed
        self.events: asyncio.Queue = asyncio.Queue()
        self.jobs = [Job(r, self.events, tag=i) for i, r in enumerate(parsed.requests)] if parsed.generate else []
        self.watch = None

    async def submit(self):
        if self.jobs and not self.state.scheduler.submit(self.jobs):
            self.state.metrics["rejected"] += 1
            raise HTTPError(429, f"the server is busy: {self.state.scheduler.queue_depth()} requests are waiting "
                                 f"(--max-queue). Retry later.", "rate_limit_error")
        return self

    def watch_disconnect(self):
        async def watch():
            while (await self.http.receive())["type"] != "http.disconnect":
                pass
            self.events.put_nowait((None, "gone", None))
        self.watch = asyncio.create_task(watch())

    async def close(self):
        if self.watch is not None:
            self.watch.cancel()
        left = [j for j in self.jobs if j.remaining > 0]
        if left:
            self.state.scheduler.cancel(left)

    async def results(self) -> list[list]:
        """Every job's Results by sample; raises HTTPError on a scheduler error, returns None if the client left."""
        done = {}
        total = sum(j.request.n for j in self.jobs)
        while len(done) < total:
            tag, kind, val = await self.events.get()
            if kind == "gone":
                return None
            if kind == "error":
                raise HTTPError(val[0], val[1], ERROR_TYPES.get(val[0], "server_error"))
            if kind == "done":
                done[tag, val.sample] = val
                self.jobs[tag].remaining -= 1
        return [[done[t, s] for s in range(j.request.n)] for t, j in enumerate(self.jobs)]

    async def finished(self) -> list[list] | None:
        """The results once the run is done (an HTTPError if generation failed), or None when the client went away
        (the route answers 499)."""
        try:
            self.watch_disconnect()
            results = await self.results()
        finally:
            await self.close()
        if results is not None:
            _failed(results)
        return results

    async def scores(self, seqs: list[list[int]], top: int):
        model = self.state.engine.model
        return await self.state.scheduler.call(lambda: [score_prompt(model, p, top) for p in seqs])

    def scored_ids(self, results) -> list[list[int]]:
        """Per choice, the ids whose log-probabilities an echo returns: the prompt, the output, and the stop token
        that ended it (vLLM's and OpenAI's echo include it; lm-eval's loglikelihood drops exactly one last entry)."""
        if not self.parsed.generate:
            return [list(p) for p in self.parsed.prompts]
        eos = self.state.tokenizer.eos_token_id
        return [list(p) + r.token_ids + ([eos] if r.stop_token is not None and r.stop_token[0] == eos else [])
                for p, rs in zip(self.parsed.prompts, results) for r in rs]


def _failed(results) -> None:
    bad = [r for rs in results for r in rs if r.finish_reason == "error"]
    if bad:
        raise HTTPError(500, f"generation failed for this request: {bad[0].error}", "server_error")


def legacy_logprobs(tok, ids: list[int], lps: list, tops: list) -> dict:
    """OpenAI's completions logprobs: tokens, token_logprobs, top_logprobs ({token: logprob}), text_offset."""
    tokens = [tok.decode([t]) for t in ids]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    top = [None if alts is None else {tok.decode([t]): v for t, v in alts} for alts in tops]
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(tok, entries: list[dict]) -> dict:
    def one(t, v):
        s = tok.decode([t])
        return {"token": s, "logprob": v, "bytes": list(s.encode())}
    return {"content": [dict(one(e["token"], e["logprob"]), top_logprobs=[one(t, v) for t, v in e["top"]])
                        for e in entries]}


def _usage(prompts, results):
    p = sum(len(x) for x in prompts)
    c = sum(len(r.token_ids) for rs in results for r in rs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def chat_message(res, parsed: Parsed) -> tuple[dict, str]:
    msg = {"role": "assistant", "content": res.content}
    if res.reasoning is not None:
        msg["reasoning_content"] = res.reasoning
    finish = res.finish_reason
    if parsed.tools:
        content, calls = parse_tool_calls(res.content, parsed.tools)
        if calls:
            msg["content"], msg["tool_calls"], finish = content or None, openai_calls(calls), "tool_calls"
    return msg, finish


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def build_app(state) -> FastAPI:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None, lifespan=state.lifespan)

    @app.exception_handler(HTTPError)
    async def _http_error(request, e: HTTPError):
        return _error_response(e)

    @app.exception_handler(HTTPException)
    async def _starlette_error(request, e: HTTPException):
        msg = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return _error_response(HTTPError(e.status_code, msg, ERROR_TYPES.get(e.status_code, "invalid_request_error")))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.name, "object": "model", "created": state.created,
                                            "owned_by": "nemotron3", "max_model_len": state.engine.max_model_len}]}

    @app.get("/metrics")
    async def metrics():
        return Response(state.prometheus(), media_type="text/plain; version=0.0.4")

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tok = state.tokenizer
        eos = getattr(tok, "eos_token", None) or (chr(tok.eos_token_id) if tok.eos_token_id is not None and
                                                  tok.eos_token_id < 128 else None)
        return {"eos_token": eos, "bos_token": getattr(tok, "bos_token", None), "pad_token": None,
                "model_max_length": state.engine.max_model_len, "vocab_size": state.engine.model.config.vocab_size}

    @app.post("/tokenize")
    async def tokenize(request: HTTPRequest):
        body = await read_json(request)
        if not isinstance(body, dict) or not (isinstance(body.get("prompt"), str) or "messages" in body):
            raise HTTPError(400, "/tokenize takes {\"prompt\": text} or {\"messages\": [...]}.")
        if "messages" in body:                               # rendered exactly as a chat request would be
            try:
                tools, choice = tool_format.parse_tools(body.get("tools"), None)
                text = tool_format.render_prompt(state.tokenizer, parse_messages(body["messages"]), tools,
                                                 (body.get("chat_template_kwargs") or {}).get("enable_thinking", True))
            except ValueError as e:
                raise HTTPError(400, str(e), param="messages") from None
        else:
            text = body["prompt"]
        ids = state.tokenizer.encode(text)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: HTTPRequest):
        body = await read_json(request)
        ids = body.get("tokens") if isinstance(body, dict) else None
        V = state.engine.model.config.vocab_size
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < V
                                                for t in ids):
            raise HTTPError(400, f"/detokenize takes {{\"tokens\": [ids in [0, {V})]}}.", param="tokens")
        return {"prompt": state.tokenizer.decode(ids)}

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        state.metrics["requests"] += 1
        parsed = validated(state, parse_completion, await read_json(request))
        run = Run(state, request, parsed)
        await run.submit()
        if parsed.stream:
            return StreamingResponse(_guarded(run, _stream_completion(state, run)), media_type="text/event-stream")
        try:
            run.watch_disconnect()
            results = await run.results() if parsed.generate else [[None] for _ in parsed.prompts]
            scores = scored = None
            if results is not None and parsed.echo and parsed.logprobs is not None:
                scored = run.scored_ids(results)
                scores = await run.scores(scored, parsed.logprobs)
        finally:
            await run.close()
        if results is None:
            return Response(status_code=499)
        _failed([[r for r in rs if r is not None] for rs in results])
        tok, choices = state.tokenizer, []
        n = len(results[0])
        for i, ids in enumerate(parsed.prompts):
            for s, res in enumerate(results[i]):
                text = (tok.decode(ids) if parsed.echo else "") + (res.text if res else "")
                lp = None
                if scores is not None:                       # echo: every entry from one forward, first one null
                    sc = scores[i * n + s]
                    lp = legacy_logprobs(tok, scored[i * n + s], [None] + sc.token_logprobs, [None] + sc.top)
                elif parsed.logprobs is not None:
                    gen = res.logprobs or []
                    lp = legacy_logprobs(tok, [e["token"] for e in gen], [e["logprob"] for e in gen],
                                         [e["top"] for e in gen])
                choices.append({"index": i * n + s, "text": text, "logprobs": lp,
                                "finish_reason": res.finish_reason if res else "length"})
        results = [[r for r in rs if r is not None] for rs in results]
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": state.name, "choices": choices, "usage": _usage(parsed.prompts, results)}

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        state.metrics["requests"] += 1
        parsed = validated(state, parse_chat, await read_json(request))
        run = Run(state, request, parsed)
        await run.submit()
        if parsed.stream:
            return StreamingResponse(_guarded(run, _stream_chat(state, run)), media_type="text/event-stream")
        results = await run.finished()
        if results is None:
            return Response(status_code=499)
        choices = []
        for res in results[0]:
            msg, finish = chat_message(res, parsed)
            lp = chat_logprobs(state.tokenizer, res.logprobs or []) if parsed.logprobs is not None else None
            choices.append({"index": res.sample, "message": msg, "logprobs": lp, "finish_reason": finish})
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": state.name, "choices": choices, "usage": _usage(parsed.prompts, results)}

    from .responses import add_routes
    add_routes(app, state)
    return app


async def _guarded(run: Run, gen):
    """A stream's jobs are cancelled however it ends (finished, client gone, server shutting down)."""
    try:
        async for chunk in gen:
            yield chunk
    finally:
        await run.close()


async def _stream_completion(state, run: Run):
    parsed, tok = run.parsed, state.tokenizer
    cid, n = f"cmpl-{uuid.uuid4().hex[:24]}", parsed.requests[0].n

    def chunk(index, text, finish=None, lp=None):
        return _sse({"id": cid, "object": "text_completion", "created": int(time.time()), "model": state.name,
                     "choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": finish}]})

    if parsed.echo:
        scores = await run.scores(parsed.prompts, parsed.logprobs) if parsed.logprobs is not None else None
        for i, ids in enumerate(parsed.prompts):
            lp = legacy_logprobs(tok, ids, [None] + scores[i].token_logprobs, [None] + scores[i].top) if scores else None
            for s in range(n):
                yield chunk(i * n + s, tok.decode(ids), lp=lp)
    left, completion = sum(r.n for r in parsed.requests), 0
    while left:
        tag, kind, val = await run.events.get()
        if kind == "error":
            yield _sse({"error": {"message": val[1], "type": ERROR_TYPES.get(val[0], "server_error"), "code": val[0]}})
            break
        index = tag * n + val.sample
        if kind == "token":
            lp = None
            if parsed.logprobs is not None and val.logprob is not None:
                e = val.logprob
                lp = legacy_logprobs(tok, [e["token"]], [e["logprob"]], [e["top"]])
            if val.text or lp:
                yield chunk(index, val.text, lp=lp)
            continue
        left, completion = left - 1, completion + len(val.token_ids)
        run.jobs[tag].remaining -= 1
        yield chunk(index, "", val.finish_reason)
    if parsed.include_usage:
        p = sum(len(x) for x in parsed.prompts)
        yield _sse({"id": cid, "object": "text_completion", "created": int(time.time()), "model": state.name,
                    "choices": [], "usage": {"prompt_tokens": p, "completion_tokens": completion,
                                             "total_tokens": p + completion}})
    yield b"data: [DONE]\n\n"


async def _stream_chat(state, run: Run):
    parsed, tok = run.parsed, state.tokenizer
    cid, n = f"chatcmpl-{uuid.uuid4().hex[:24]}", parsed.requests[0].n

    def chunk(choices, **extra):
        return _sse({"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": state.name,
                     "choices": choices, **extra})

    def delta(i, d, lp=None, finish=None):
        return chunk([{"index": i, "delta": d, "logprobs": lp, "finish_reason": finish}])

    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                 for i in range(n)])
    split = [ReasoningStream(parsed.requests[0].thinking) for _ in range(n)]
    calls = [ToolCallStream(parsed.tools) if parsed.tools else None for _ in range(n)]
    made_calls = [False] * n
    left, completion = n, 0
    while left:
        _, kind, val = await run.events.get()
        if kind == "error":
            yield chunk([], error={"message": val[1], "type": ERROR_TYPES.get(val[0], "server_error"), "code": val[0]})
            break
        i = val.sample
        if kind == "token":
            reasoning, content = split[i].feed(val.text)
        else:
            reasoning, content = split[i].finish()
        deltas = []
        if calls[i] is not None:
            content, deltas = calls[i].feed(content)
            if kind == "done":
                more, last = calls[i].finish()
                content, deltas = content + more, deltas + last
            made_calls[i] = made_calls[i] or bool(deltas)
        lp = None
        if kind == "token" and parsed.logprobs is not None and val.logprob is not None:
            lp = chat_logprobs(tok, [val.logprob])
        finish = None
        if kind == "done":
            left, completion = left - 1, completion + len(val.token_ids)
            run.jobs[0].remaining -= 1
            finish = "tool_calls" if made_calls[i] else val.finish_reason
        text = ({"reasoning_content": reasoning} if reasoning else {}) | ({"content": content} if content else {})
        if text or lp is not None:
            yield delta(i, text, lp)
        for d in deltas:                                      # a call: its id + name, then its arguments
            yield delta(i, {"tool_calls": [d]})
        if finish is not None:
            yield delta(i, {}, finish=finish)
    if parsed.include_usage:
        p = len(parsed.prompts[0])
        yield chunk([], usage={"prompt_tokens": p, "completion_tokens": completion, "total_tokens": p + completion})
    yield b"data: [DONE]\n\n"

