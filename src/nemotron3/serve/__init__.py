"""OpenAI-compatible serving: protocol (request bodies -> engine requests), scheduler (the thread that owns the
engine), guard (HTTP limits, timeouts, auth), app (FastAPI routes, SSE), responses (/v1/responses), tools (tool-call
format), grammar (structured output), server (putting them together on uvicorn). `nemotron3 serve --model DIR`."""

from .server import ServeConfig, make_server

__all__ = ["ServeConfig", "make_server"]
