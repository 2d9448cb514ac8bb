"""OpenAI-compatible serving: protocol (request bodies -> engine requests), batcher (continuous batching over
the hybrid cache), server (HTTP routes, streaming, metrics, auth). `nemotron3 serve --model DIR`."""

from .batcher import Batcher
from .server import make_server

__all__ = ["Batcher", "make_server"]
