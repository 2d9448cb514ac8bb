"""OpenAI-compatible serving: protocol (request bodies -> engine requests), server (HTTP routes, streaming,
metrics, auth; one scheduler thread driving the inference engine). `nemotron3 serve --model DIR`."""

from .server import make_server

__all__ = ["make_server"]
