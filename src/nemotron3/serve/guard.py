"""What stands between the network and the routes: a deadline for request headers (slowloris), the API key checked
before any body byte is read (in constant time), a body size limit (from Content-Length up front, counted for
chunked bodies), and a deadline for the whole body (a client that stops sending, or a Content-Length larger than
what it sends, gets 408 instead of holding anything). The routes see a body only once it is complete.

uvicorn (h11) parses HTTP, keeps connections alive and closes idle ones (`timeout_keep_alive`), but a connection
whose headers never finish has no deadline there: `HeaderDeadlineH11` adds one. Leaves out: rate limiting per
client and TLS (put a reverse proxy in front for both).
"""

from __future__ import annotations

import asyncio
import hmac
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def header_deadline_protocol(seconds: float):
    """An h11 protocol class that closes a connection whose request headers are not complete `seconds` after the
    connection opened or the request's first byte arrived."""

    class HeaderDeadlineH11(H11Protocol):
        _timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:
                self._arm()
            else:
                self._disarm()

        def on_response_complete(self) -> None:
            self._disarm()                                # the keep-alive timeout takes over
            super().on_response_complete()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _arm(self):
            if self._timer is None and not self.transport.is_closing():
                self._timer = self.loop.call_later(seconds, self._expired)

        def _disarm(self):
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expired(self):
            self._timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadlineH11


def error_body(status: int, message: str, etype: str, param=None) -> bytes:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return json.dumps({"error": {"message": message, "type": etype, "param": param, "code": status}}).encode()


class Guard:
    """ASGI middleware: auth, then the body (size limit, deadline), then the app with the body replayed."""

    def __init__(self, app, api_key: str | None, max_body: int, body_timeout: float, open_paths=("/health",)):
        self.app, self.max_body, self.body_timeout, self.open_paths = app, max_body, body_timeout, open_paths
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected is not None and scope["path"] not in self.open_paths:
            got = headers.get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):       # constant time: no key prefix leaks
                return await _reply(send, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'.",
                                    "authentication_error")
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await _reply(send, 400, "Content-Length must be a non-negative integer.")
            if int(length) > self.max_body:
                return await _reply(send, 413, f"the body is {int(length)} bytes; this server accepts at most "
                                               f"{self.max_body} (--max-body-bytes).")
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.body_timeout):
                while True:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        return
                    chunks.append(msg.get("body", b""))
                    size += len(chunks[-1])
                    if size > self.max_body:
                        return await _reply(send, 413, f"the body exceeds {self.max_body} bytes (--max-body-bytes).")
                    if not msg.get("more_body", False):
                        break
        except TimeoutError:
            return await _reply(send, 408, f"the request body did not arrive within {self.body_timeout:g} s "
                                           f"(check Content-Length; --body-timeout).", "timeout_error")
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()                           # after the body: only http.disconnect remains

        await self.app(scope, replay, send)


async def _reply(send, status: int, message: str, etype: str = "invalid_request_error"):
    """Answer and close: the body (if any) was not read, so the connection cannot carry another request."""
    data = error_body(status, message, etype)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})
