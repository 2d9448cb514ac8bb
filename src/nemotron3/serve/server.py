"""OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics.

    nemotron3 serve --model runs/demo/final --port 8000 [--api-key KEY] [--max-batch 8] [--no-speculative]

One scheduler thread owns the model and a Batcher (continuous batching, MTP speculative decoding when the model
has MTP heads); HTTP handler threads validate a request, queue it (bounded: past --max-queue the answer is 429)
and relay its tokens, as server-sent events when `stream` is true. A client that disconnects cancels its request
and frees its slot at the next step. Reasoning models: the text inside <think>...</think> is returned as
`reasoning_content` (message and stream deltas), `chat_template_kwargs: {"enable_thinking": false}` turns it off,
`max_thinking_tokens` / `reasoning_budget` caps it. Errors use OpenAI's body: {"error": {"message", "type",
"param", "code"}}; a bad request is a 400, never a 500 or a dead server.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .batcher import Batcher
from .protocol import RequestError, parse_chat, parse_completion


class Job:
    def __init__(self, request):
        self.request, self.events = request, queue.Queue()
        self.cancelled, self.t_submit, self.t_first = False, time.perf_counter(), None


class Scheduler(threading.Thread):
    """Admits queued jobs into free slots between steps and runs steps while any slot is busy."""

    def __init__(self, batcher: Batcher, max_queue: int, metrics: dict):
        super().__init__(daemon=True)
        self.batcher, self.max_queue, self.metrics = batcher, max_queue, metrics
        self.waiting: deque[Job] = deque()
        self.cond = threading.Condition()
        self.continuous = True           # False: a batch runs to completion before new requests join (baseline)

    def submit(self, jobs: list[Job]) -> bool:
        with self.cond:
            if len(self.waiting) + len(jobs) > self.max_queue:
                return False
            self.waiting.extend(jobs)
            self.cond.notify()
        return True

    def queue_depth(self) -> int:
        return len(self.waiting)

    def run(self):
        b = self.batcher
        while True:
            with self.cond:
                while not self.waiting and not b.active():
                    self.cond.wait()
                admit = []
                if self.continuous or not b.active():
                    while self.waiting and len(admit) < b.free_slots():
                        admit.append(self.waiting.popleft())
            for job in admit:
                if job.cancelled:
                    continue
                try:
                    _, events = b.add(job.request, job)
                except Exception as e:                       # noqa: BLE001  the request's error, not the server's
                    job.events.put(("error", str(e)))
                    continue
                self._dispatch(events)
                self._finish_done()
            if b.active():
                try:
                    self._dispatch(b.step())
                except Exception as e:                       # noqa: BLE001  fail the running requests, keep serving
                    for slot, job in enumerate(b.keys):
                        if job is not None:
                            job.events.put(("error", f"generation failed: {e}"))
                            b.release(slot)
                self._finish_done()

    def _dispatch(self, events):
        for ev in events:
            job = self.batcher.keys[ev.index]
            if job is None:
                continue
            if job.t_first is None:
                job.t_first = time.perf_counter()
                self.metrics["ttft_sum"] += job.t_first - job.t_submit
                self.metrics["ttft_count"] += 1
            self.metrics["completion_tokens"] += 1
            job.events.put(("token", ev))

    def _finish_done(self):
        b = self.batcher
        for slot, (row, job) in enumerate(zip(b.rows, b.keys)):
            if job is None:
                continue
            if job.cancelled:
                b.release(slot)
                self.metrics["cancelled"] += 1
            elif row.done:
                job.events.put(("done", row.result()))
                b.release(slot)


def _error(status: int, message: str, param=None, etype="invalid_request_error") -> tuple[int, dict]:
    return status, {"error": {"message": message, "type": etype, "param": param, "code": None}}


class Handler(BaseHTTPRequestHandler):
    server_version = "nemotron3"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):                          # quiet; metrics carry the numbers
        pass

    # ---- plumbing ----
    def _send(self, status: int, body, content_type="application/json"):
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        key = self.server.state["api_key"]
        if not key:
            return True
        if self.headers.get("Authorization", "") == f"Bearer {key}":
            return True
        self._send(*_error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'.",
                           etype="authentication_error"))
        return False

    def do_GET(self):
        st = self.server.state
        if self.path == "/health":
            return self._send(200, {"status": "ok"})
        if not self._authorized():
            return
        if self.path == "/v1/models":
            return self._send(200, {"object": "list", "data": [{"id": st["name"], "object": "model",
                                                                "created": st["created"], "owned_by": "nemotron3"}]})
        if self.path == "/metrics":
            return self._send(200, _prometheus(st), "text/plain; version=0.0.4")
        self._send(*_error(404, f"no route GET {self.path}", etype="not_found_error"))

    def do_POST(self):
        st = self.server.state
        st["metrics"]["requests"] += 1
        try:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
        except (ValueError, OSError):
            return self._send(*_error(400, "could not read the request body."))
        if not self._authorized():
            return
        if self.path not in ("/v1/chat/completions", "/v1/completions"):
            return self._send(*_error(404, f"no route POST {self.path}", etype="not_found_error"))
        try:
            body = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return self._send(*_error(400, f"malformed JSON: {e}"))
        try:
            chat = self.path == "/v1/chat/completions"
            parsed = (parse_chat if chat else parse_completion)(body, st["tokenizer"], st["batcher"].context)
            jobs = [Job(r) for r in parsed["requests"]]
            for j in jobs:
                st["batcher"].check([j.request])
        except RequestError as e:
            st["metrics"]["errors"] += 1
            return self._send(*_error(400, str(e), e.param))
        except ValueError as e:
            st["metrics"]["errors"] += 1
            return self._send(*_error(400, str(e)))
        if not st["scheduler"].submit(jobs):
            st["metrics"]["rejected"] += 1
            return self._send(*_error(429, f"the server is busy: {st['scheduler'].queue_depth()} requests are "
                                           f"waiting (--max-queue). Retry later.", etype="rate_limit_error"))
        try:
            if parsed["stream"]:
                self._stream(jobs, parsed, chat)
            else:
                self._complete(jobs, parsed, chat)
        except (BrokenPipeError, ConnectionResetError):
            for j in jobs:
                j.cancelled = True

    def _wait(self, job):
        """The job's Result once it is done (its token events are not needed here)."""
        while True:
            kind, val = job.events.get()
            if kind == "done":
                return val
            if kind == "error":
                raise RuntimeError(val)

    def _complete(self, jobs, parsed, chat):
        st, choices, usage = self.server.state, [], {"prompt_tokens": 0, "completion_tokens": 0}
        try:
            results = [self._wait(j) for j in jobs]
        except RuntimeError as e:
            return self._send(*_error(500, str(e), etype="server_error"))
        for i, res in enumerate(results):
            usage["prompt_tokens"] = res.prompt_tokens
            usage["completion_tokens"] += len(res.token_ids)
            lp = _logprobs(res, st["tokenizer"], chat) if parsed["logprobs"] is not None else None
            if chat:
                msg = {"role": "assistant", "content": res.content if res.reasoning is not None else res.text}
                if res.reasoning is not None:
                    msg["reasoning_content"] = res.reasoning
                choices.append({"index": i, "message": msg, "logprobs": lp, "finish_reason": res.finish_reason})
            else:
                choices.append({"index": i, "text": res.text, "logprobs": lp, "finish_reason": res.finish_reason})
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        self._send(200, {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                         "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                         "model": st["name"], "choices": choices, "usage": usage})

    def _stream(self, jobs, parsed, chat):
        st = self.server.state
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        obj = "chat.completion.chunk" if chat else "text_completion"

        def send(choices, **extra):
            chunk = {"id": cid, "object": obj, "created": int(time.time()), "model": st["name"], "choices": choices}
            chunk.update(extra)
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        if chat:
            send([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                  for i in range(len(jobs))])
        split = [_ThoughtSplitter(j.request.thinking) for j in jobs]
        prompt_tokens, completion = len(jobs[0].request.prompt_ids), 0
        for i, job in enumerate(jobs):           # choices stream one after another (each is generated batched)
            while True:
                kind, val = job.events.get()
                if kind == "error":
                    send([{"index": i, "delta": {}, "finish_reason": "error"}], error={"message": val})
                    break
                if kind == "token":
                    if chat:
                        reasoning, content = split[i].feed(val.text)
                        delta = {}
                        if reasoning:
                            delta["reasoning_content"] = reasoning
                        if content:
                            delta["content"] = content
                        if delta:
                            send([{"index": i, "delta": delta, "finish_reason": None}])
                    elif val.text:
                        send([{"index": i, "text": val.text, "finish_reason": None}])
                    continue
                completion += len(val.token_ids)
                if chat:
                    reasoning, content = split[i].flush()
                    delta = ({"reasoning_content": reasoning} if reasoning else {}) | (
                        {"content": content} if content else {})
                    send([{"index": i, "delta": delta, "finish_reason": val.finish_reason}])
                else:
                    send([{"index": i, "text": "", "finish_reason": val.finish_reason}])
                break
        if parsed["include_usage"]:
            send([], usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                            "total_tokens": prompt_tokens + completion})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


class _ThoughtSplitter:
    """Splits streamed text into reasoning (inside <think>...</think>) and content, holding back a partial tag."""

    def __init__(self, thinking: bool):
        self.in_thought, self.buf, self.started = thinking, "", False

    def feed(self, text: str) -> tuple[str, str]:
        self.buf += text
        if not self.in_thought:
            if not self.started and "<think>".startswith(self.buf.lstrip()) and self.buf.strip():
                return "", ""                                   # maybe the start of an opening tag
            if not self.started and self.buf.lstrip().startswith("<think>"):
                self.in_thought, self.buf = True, self.buf.lstrip()[len("<think>"):]
                return self.feed("")
            self.started = True
            out, self.buf = self.buf, ""
            return "", out
        if "</think>" in self.buf:
            reasoning, rest = self.buf.split("</think>", 1)
            self.in_thought, self.buf, self.started = False, "", True
            return reasoning, rest.lstrip("\n")
        keep = next((k for k in range(min(len(self.buf), 8), 0, -1) if "</think>".startswith(self.buf[-k:])), 0)
        out, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return out, ""

    def flush(self) -> tuple[str, str]:
        out, self.buf = self.buf, ""
        return (out, "") if self.in_thought else ("", out)


def _logprobs(res, tok, chat: bool):
    entries = []
    for lp in res.logprobs or []:
        text = tok.decode([lp["token"]])
        top = [{"token": tok.decode([t]), "logprob": v, "bytes": list(tok.decode([t]).encode())} for t, v in lp["top"]]
        entries.append({"token": text, "logprob": lp["logprob"], "bytes": list(text.encode()), "top_logprobs": top})
    if chat:
        return {"content": entries}
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries]}


def _prometheus(st) -> str:
    m, b = st["metrics"], st["batcher"]
    up = time.perf_counter() - st["t_start"]
    lines = [
        ("nemotron3_requests_total", "counter", m["requests"], "HTTP POST requests received"),
        ("nemotron3_request_errors_total", "counter", m["errors"], "requests rejected as invalid (400)"),
        ("nemotron3_requests_rejected_total", "counter", m["rejected"], "requests refused with 429 (queue full)"),
        ("nemotron3_requests_cancelled_total", "counter", m["cancelled"], "requests whose client disconnected"),
        ("nemotron3_completion_tokens_total", "counter", m["completion_tokens"], "tokens generated"),
        ("nemotron3_queue_depth", "gauge", st["scheduler"].queue_depth(), "requests waiting for a slot"),
        ("nemotron3_running_requests", "gauge", b.active(), "requests in the running batch"),
        ("nemotron3_time_to_first_token_seconds_avg", "gauge",
         m["ttft_sum"] / m["ttft_count"] if m["ttft_count"] else 0.0, "mean time to first token"),
        ("nemotron3_tokens_per_second_avg", "gauge", m["completion_tokens"] / up, "tokens generated / uptime"),
    ]
    out = []
    for name, kind, val, help_ in lines:
        out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {val}"]
    acc = b.acceptance()
    out += ["# HELP nemotron3_spec_acceptance share of MTP drafts accepted, per draft position",
            "# TYPE nemotron3_spec_acceptance gauge"]
    out += [f'nemotron3_spec_acceptance{{position="{k + 1}"}} {a}' for k, a in enumerate(acc)]
    return "\n".join(out) + "\n"


def make_server(model, tokenizer, host="127.0.0.1", port=8000, api_key=None, max_batch=8, max_queue=64,
                num_speculative_tokens=0, name="nemotron3", continuous=True, max_len=None):
    """A ready ThreadingHTTPServer (call serve_forever) with its scheduler thread started."""
    batcher = Batcher(model, tokenizer, max_batch, num_speculative_tokens, max_len)
    metrics = dict(requests=0, errors=0, rejected=0, cancelled=0, completion_tokens=0, ttft_sum=0.0, ttft_count=0)
    scheduler = Scheduler(batcher, max_queue, metrics)
    scheduler.continuous = continuous
    scheduler.start()
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    server.state = dict(batcher=batcher, scheduler=scheduler, tokenizer=tokenizer, api_key=api_key, name=name,
                        metrics=metrics, created=int(time.time()), t_start=time.perf_counter())
    return server

