"""OpenAI-compatible server: the engine, its scheduler thread and the FastAPI app on uvicorn, put together.

    nemotron3 serve --model runs/demo/final --port 8000 [--api-key KEY] [--max-batch 8] [--no-speculative]

One scheduler thread owns the model and the inference engine (continuous batching; MTP speculative decoding when
the model has MTP heads; n samples share one prefill); the asyncio event loop owns every connection. The HTTP
layer (uvicorn, h11) keeps connections alive, listens with a real backlog, and with guard.py bounds how long
headers and bodies may take, how large a body may be, and checks the key before reading one. SIGTERM (or Ctrl-C):
stop accepting, let in-flight requests finish for up to --shutdown-timeout seconds, cancel the rest, exit 0.
Reasoning: text inside <think>...</think> is `reasoning_content`; chat_template_kwargs.enable_thinking=false turns it
off, max_thinking_tokens / reasoning_budget caps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import dataclass

import uvicorn

from ..infer import Engine
from .app import build_app
from .guard import Guard, header_deadline_protocol
from .protocol import Limits
from .scheduler import Scheduler


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    """0 = any free port (the chosen one is `Server.server_port`)."""
    api_key: str | None = None
    """Require 'Authorization: Bearer KEY' on every route but /health; None = open."""
    max_batch: int = 8
    """Sequences decoded together (slots); a request with n samples takes n."""
    max_queue: int = 64
    """Requests waiting for slots beyond which a new one is refused with 429."""
    max_queue_time: float = 60.0
    """Seconds a request may wait for a slot before it is answered 503."""
    max_n: int = 16
    """Largest n (samples per request)."""
    max_request_tokens: int = 65536
    """Largest prompts x n x max_tokens one request may ask for."""
    max_body_bytes: int = 16 * 2 ** 20
    """Largest request body (413 beyond)."""
    header_timeout: float = 10.0
    """Seconds for a connection's request headers to arrive (slowloris)."""
    body_timeout: float = 30.0
    """Seconds for a request's whole body to arrive (408 beyond)."""
    keep_alive: float = 5.0
    """Seconds an idle keep-alive connection stays open."""
    backlog: int = 2048
    """Listen backlog: connections the kernel queues before accept."""
    max_connections: int = 4096
    """Open connections beyond which a new one is answered 503."""
    shutdown_timeout: float = 10.0
    """On SIGTERM, seconds in-flight requests get to finish before they are cancelled."""
    num_speculative_tokens: int | dict = 0
    name: str = "nemotron3"
    continuous: bool = True
    """False: a batch runs to completion before waiting requests join (the baseline of bench/serve_load.py)."""
    max_len: int | None = None


class State:
    """What the routes share: the engine, the scheduler (made when the loop starts), tokenizer, limits, metrics."""

    def __init__(self, engine: Engine, tokenizer, cfg: ServeConfig):
        self.engine, self.tokenizer, self.cfg, self.name = engine, tokenizer, cfg, cfg.name
        self.limits = Limits(cfg.max_n, cfg.max_request_tokens)
        self.metrics = dict(requests=0, errors=0, rejected=0, cancelled=0, expired=0, completion_tokens=0,
                            ttft_sum=0.0, ttft_count=0)
        self.created, self.t_start, self.scheduler = int(time.time()), time.perf_counter(), None

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        self.scheduler = Scheduler(self.engine, asyncio.get_running_loop(), self.cfg.max_queue,
                                   self.cfg.max_queue_time, self.metrics, self.cfg.continuous)
        self.scheduler.start()
        yield
        self.scheduler.stop()
        self.scheduler.join(30)

    def constrain(self, parsed) -> None:
        from .grammar import attach_grammars
        attach_grammars(parsed, self.tokenizer, self.engine.model.config.vocab_size)

    def prometheus(self) -> str:
        m, e = self.metrics, self.engine
        up = time.perf_counter() - self.t_start
        lines = [
            ("nemotron3_requests_total", "counter", m["requests"], "generation requests received"),
            ("nemotron3_request_errors_total", "counter", m["errors"], "requests rejected as invalid (400)"),
            ("nemotron3_requests_rejected_total", "counter", m["rejected"], "requests refused with 429 (queue full)"),
            ("nemotron3_requests_expired_total", "counter", m["expired"], "requests answered 503 (waited too long)"),
            ("nemotron3_requests_cancelled_total", "counter", m["cancelled"], "requests whose client disconnected"),
            ("nemotron3_completion_tokens_total", "counter", m["completion_tokens"], "tokens generated"),
            ("nemotron3_queue_depth", "gauge", self.scheduler.queue_depth(), "requests waiting for a slot"),
            ("nemotron3_running_requests", "gauge", e.num_running(), "sequences in the running batch"),
            ("nemotron3_time_to_first_token_seconds_avg", "gauge",
             m["ttft_sum"] / m["ttft_count"] if m["ttft_count"] else 0.0, "mean time to first token"),
            ("nemotron3_tokens_per_second_avg", "gauge", m["completion_tokens"] / up, "tokens generated / uptime"),
        ]
        out = []
        for name, kind, val, help_ in lines:
            out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {val}"]
        out += ["# HELP nemotron3_spec_acceptance share of MTP drafts accepted, per draft position",
                "# TYPE nemotron3_spec_acceptance gauge"]
        out += [f'nemotron3_spec_acceptance{{position="{k + 1}"}} {a}' for k, a in enumerate(e.acceptance())]
        return "\n".join(out) + "\n"


class Server:
    """A bound socket and a uvicorn server over the app; `serve_forever()` runs until SIGTERM / SIGINT."""

    def __init__(self, state: State, cfg: ServeConfig):
        self.state = state
        self.sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((cfg.host, cfg.port))
        self.sock.listen(cfg.backlog)
        self.server_port = self.sock.getsockname()[1]
        app = Guard(build_app(state), cfg.api_key, cfg.max_body_bytes, cfg.body_timeout)
        self.uvicorn = uvicorn.Server(uvicorn.Config(
            app, http=header_deadline_protocol(cfg.header_timeout), lifespan="on", log_level="warning",
            access_log=False, backlog=cfg.backlog, timeout_keep_alive=cfg.keep_alive,
            limit_concurrency=cfg.max_connections, timeout_graceful_shutdown=cfg.shutdown_timeout,
            h11_max_incomplete_event_size=64 * 1024))

    def serve_forever(self) -> None:
        self.uvicorn.run(sockets=[self.sock])


def make_server(model, tokenizer, cfg: ServeConfig | None = None, **overrides) -> Server:
    """A ready Server (call serve_forever); its scheduler thread starts with the event loop."""
    cfg = cfg or ServeConfig(**overrides)
    engine = Engine(model, tokenizer, cfg.num_speculative_tokens, max_batch=cfg.max_batch, max_model_len=cfg.max_len)
    if cfg.max_n > cfg.max_batch:
        cfg.max_n = cfg.max_batch                          # n samples need n rows at once
    return Server(State(engine, tokenizer, cfg), cfg)
