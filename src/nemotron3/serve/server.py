"""OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics.

    nemotron3 serve --model runs/demo/final --port 8000 [--api-key KEY] [--max-batch 8] [--no-speculative]

One scheduler thread owns the model and the inference engine (continuous batching: requests join and leave the
running batch at any step; MTP speculative decoding when the model has MTP heads; n samples share one prefill);
HTTP handler threads validate a request, queue it (bounded: past --max-queue the answer is 429) and relay its
tokens, as server-sent events when `stream` is true. A client that disconnects cancels its request and frees its
rows at the next step. Reasoning models: the text inside <think>...</think> is returned as
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

from ..infer import Engine, ReasoningStream
from .protocol import RequestError, parse_chat, parse_completion


class Job:
    """One HTTP request: its engine Request (n samples) and the queue its events are relayed through."""

    def __init__(self, request):
        self.request, self.events = request, queue.Queue()
        self.rid, self.remaining = None, request.n
        self.cancelled, self.t_submit, self.t_first = False, time.perf_counter(), None


class Scheduler(threading.Thread):
    """The one thread that owns the engine: hands queued jobs to it, runs steps while anything is unfinished and
    relays each step's events to the jobs' queues. HTTP threads only submit and read."""

    def __init__(self, engine: Engine, max_queue: int, metrics: dict):
        super().__init__(daemon=True)
        self.engine, self.max_queue, self.metrics = engine, max_queue, metrics
        self.waiting: deque[Job] = deque()
        self.jobs: dict[int, Job] = {}
        self.cond = threading.Condition()
        self.continuous = True           # False: a batch runs to completion before new requests join (baseline)

    def submit(self, job: Job) -> bool:
        with self.cond:
            if len(self.waiting) + self.engine.num_waiting() >= self.max_queue:
                return False
            self.waiting.append(job)
            self.cond.notify()
        return True

    def queue_depth(self) -> int:
        return len(self.waiting) + self.engine.num_waiting()

    def run(self):
        e = self.engine
        while True:
            with self.cond:
                while not self.waiting and not e.has_unfinished():
                    self.cond.wait()
                admit = []
                if self.continuous or not e.num_running():
                    while self.waiting and (self.continuous or len(admit) < e.max_batch):
                        admit.append(self.waiting.popleft())
            for job in admit:
                if not job.cancelled:
                    job.rid = e.add_request(job.request)
                    self.jobs[job.rid] = job
            for rid, job in list(self.jobs.items()):
                if job.cancelled:
                    e.abort(rid)
                    del self.jobs[rid]
                    self.metrics["cancelled"] += 1
            if not e.has_unfinished():
                continue
            try:
                events = e.step()
            except Exception as exc:                       # noqa: BLE001  a bug must not kill the server
                for rid, job in list(self.jobs.items()):
                    e.abort(rid)
                    job.events.put(("error", f"generation failed: {exc}"))
                self.jobs.clear()
                continue
            self._dispatch(events)

    def _dispatch(self, events):
        for ev in events:
            job = self.jobs.get(ev.request_id)
            if job is None:
                continue
            if ev.token_id is not None:
                if job.t_first is None:
                    job.t_first = time.perf_counter()
                    self.metrics["ttft_sum"] += job.t_first - job.t_submit
                    self.metrics["ttft_count"] += 1
                self.metrics["completion_tokens"] += 1
                job.events.put(("token", ev))
            if ev.result is not None:
                job.events.put(("done", ev.result))
                job.remaining -= 1
                if job.remaining == 0:
                    del self.jobs[ev.request_id]


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
            parsed = (parse_chat if chat else parse_completion)(body, st["tokenizer"], st["engine"].max_model_len)
            st["engine"].check(parsed["request"])
        except RequestError as e:
            st["metrics"]["errors"] += 1
            return self._send(*_error(400, str(e), e.param))
        except ValueError as e:
            st["metrics"]["errors"] += 1
            return self._send(*_error(400, str(e)))
        job = Job(parsed["request"])
        if not st["scheduler"].submit(job):
            st["metrics"]["rejected"] += 1
            return self._send(*_error(429, f"the server is busy: {st['scheduler'].queue_depth()} requests are "
                                           f"waiting (--max-queue). Retry later.", etype="rate_limit_error"))
        try:
            if parsed["stream"]:
                self._stream(job, parsed, chat)
            else:
                self._complete(job, parsed, chat)
        except (BrokenPipeError, ConnectionResetError):
            job.cancelled = True

    def _results(self, job):
        """The job's Results (one per sample, in sample order) once all are done."""
        done = {}
        while len(done) < job.request.n:
            kind, val = job.events.get()
            if kind == "done":
                done[val.sample] = val
            elif kind == "error":
                raise RuntimeError(val)
        return [done[i] for i in range(job.request.n)]

    def _complete(self, job, parsed, chat):
        st, choices = self.server.state, []
        try:
            results = self._results(job)
        except RuntimeError as e:
            return self._send(*_error(500, str(e), etype="server_error"))
        failed = [r for r in results if r.finish_reason == "error"]
        if failed:
            return self._send(*_error(500, f"generation failed for this request: {failed[0].error}",
                                      etype="server_error"))
        usage = {"prompt_tokens": results[0].prompt_tokens, "completion_tokens": sum(len(r.token_ids) for r in results)}
        for res in results:
            lp = _logprobs(res.logprobs, st["tokenizer"], chat) if parsed["logprobs"] is not None else None
            if chat:
                msg = {"role": "assistant", "content": res.content}
                if res.reasoning is not None:
                    msg["reasoning_content"] = res.reasoning
                choices.append({"index": res.sample, "message": msg, "logprobs": lp,
                                "finish_reason": res.finish_reason})
            else:
                choices.append({"index": res.sample, "text": res.text, "logprobs": lp,
                                "finish_reason": res.finish_reason})
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        self._send(200, {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                         "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                         "model": st["name"], "choices": choices, "usage": usage})

    def _stream(self, job, parsed, chat):
        st = self.server.state
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        obj = "chat.completion.chunk" if chat else "text_completion"
        n = job.request.n

        def send(choices, **extra):
            chunk = {"id": cid, "object": obj, "created": int(time.time()), "model": st["name"], "choices": choices}
            chunk.update(extra)
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        if chat:
            send([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                  for i in range(n)])
        split = [ReasoningStream(job.request.thinking) for _ in range(n)]
        completion, finished = 0, 0
        while finished < n:
            kind, val = job.events.get()
            if kind == "error":
                send([{"index": i, "delta": {}, "finish_reason": "error"} for i in range(n)], error={"message": val})
                break
            if kind == "token":
                i = val.sample
                if chat:
                    reasoning, content = split[i].feed(val.text)
                    delta = ({"reasoning_content": reasoning} if reasoning else {}) | (
                        {"content": content} if content else {})
                    if delta:
                        send([{"index": i, "delta": delta, "finish_reason": None}])
                elif val.text:
                    send([{"index": i, "text": val.text, "finish_reason": None}])
                continue
            i, finished, completion = val.sample, finished + 1, completion + len(val.token_ids)
            if chat:
                reasoning, content = split[i].finish()
                delta = ({"reasoning_content": reasoning} if reasoning else {}) | ({"content": content} if content else {})
                send([{"index": i, "delta": delta, "finish_reason": val.finish_reason}])
            else:
                send([{"index": i, "text": "", "finish_reason": val.finish_reason}])
        if parsed["include_usage"]:
            prompt_tokens = len(job.request.prompt_ids)
            send([], usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                            "total_tokens": prompt_tokens + completion})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def _logprobs(logprobs, tok, chat: bool):
    entries = []
    for lp in logprobs or []:
        text = tok.decode([lp["token"]])
        top = [{"token": tok.decode([t]), "logprob": v, "bytes": list(tok.decode([t]).encode())} for t, v in lp["top"]]
        entries.append({"token": text, "logprob": lp["logprob"], "bytes": list(text.encode()), "top_logprobs": top})
    if chat:
        return {"content": entries}
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries]}


def _prometheus(st) -> str:
    m, b = st["metrics"], st["engine"]
    up = time.perf_counter() - st["t_start"]
    lines = [
        ("nemotron3_requests_total", "counter", m["requests"], "HTTP POST requests received"),
        ("nemotron3_request_errors_total", "counter", m["errors"], "requests rejected as invalid (400)"),
        ("nemotron3_requests_rejected_total", "counter", m["rejected"], "requests refused with 429 (queue full)"),
        ("nemotron3_requests_cancelled_total", "counter", m["cancelled"], "requests whose client disconnected"),
        ("nemotron3_completion_tokens_total", "counter", m["completion_tokens"], "tokens generated"),
        ("nemotron3_queue_depth", "gauge", st["scheduler"].queue_depth(), "requests waiting for a slot"),
        ("nemotron3_running_requests", "gauge", b.num_running(), "sequences in the running batch"),
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
    engine = Engine(model, tokenizer, num_speculative_tokens, max_batch=max_batch, max_model_len=max_len)
    metrics = dict(requests=0, errors=0, rejected=0, cancelled=0, completion_tokens=0, ttft_sum=0.0, ttft_count=0)
    scheduler = Scheduler(engine, max_queue, metrics)
    scheduler.continuous = continuous
    scheduler.start()
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    server.state = dict(engine=engine, scheduler=scheduler, tokenizer=tokenizer, api_key=api_key, name=name,
                        metrics=metrics, created=int(time.time()), t_start=time.perf_counter())
    return server
