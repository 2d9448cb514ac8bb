"""The one reasoning parser: text inside <think>...</think> is reasoning, the rest is content (vLLM's
ReasoningParser shape: a whole-text split for finished outputs, an incremental one for streams).

A request whose prompt opened the thought (chat template with enable_thinking) starts inside it; otherwise output
that begins with "<think>" opens one. Both parts are stripped of surrounding whitespace, and the stream parser
holds back whitespace until it knows it is not trailing, so the streamed pieces join to exactly the finished split.
"""

from __future__ import annotations

from ..chat_format import THINK_CLOSE, THINK_OPEN


def split_reasoning(text: str, thinking: bool) -> tuple[str | None, str]:
    """(reasoning or None when the output has no thought, content); both stripped."""
    if not thinking and not text.lstrip().startswith(THINK_OPEN):
        return None, text.strip()
    body = text.lstrip().removeprefix(THINK_OPEN)
    reasoning, _, content = body.partition(THINK_CLOSE)
    return reasoning.strip(), content.strip()


class ReasoningStream:
    """Feed text pieces as they are generated; get (reasoning delta, content delta) back. A partial tag and
    whitespace that may turn out to be trailing are held until the next piece (or `finish`)."""

    def __init__(self, thinking: bool):
        self.in_thought, self.decided = thinking, thinking     # decided: whether the output opens a thought is known
        self.buf = ""
        self.started = {True: False, False: False}             # a part has emitted non-whitespace already
        self.pending = {True: "", False: ""}                   # held whitespace per part

    def feed(self, text: str) -> tuple[str, str]:
        self.buf += text
        out = {True: "", False: ""}
        if not self.decided:
            head = self.buf.lstrip()
            if THINK_OPEN.startswith(head) and len(head) < len(THINK_OPEN):
                return "", ""                                   # maybe the start of an opening tag
            self.decided = True
            if head.startswith(THINK_OPEN):
                self.in_thought, self.buf = True, head[len(THINK_OPEN):]
        while self.buf:
            if self.in_thought:
                if THINK_CLOSE in self.buf:
                    part, self.buf = self.buf.split(THINK_CLOSE, 1)
                    out[True] += self._part(True, part)
                    self.in_thought = False
                    continue
                keep = next((k for k in range(min(len(self.buf), len(THINK_CLOSE) - 1), 0, -1)
                             if THINK_CLOSE.startswith(self.buf[-k:])), 0)
                part, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                out[True] += self._part(True, part)
                break
            out[False] += self._part(False, self.buf)
            self.buf = ""
        return out[True], out[False]

    def finish(self) -> tuple[str, str]:
        """Whatever is still held that belongs to the output (not trailing whitespace)."""
        rest, self.buf = self.buf, ""
        if not self.decided and not self.in_thought:
            return "", self._part(False, rest)
        return (self._part(True, rest), "") if self.in_thought else ("", self._part(False, rest))

    def _part(self, reasoning: bool, text: str) -> str:
        """Strip leading whitespace of a part and hold whitespace that may be trailing."""
        if not self.started[reasoning]:
            text = text.lstrip()
            if not text:
                return ""
            self.started[reasoning] = True
        text = self.pending[reasoning] + text
        body = text.rstrip()
        self.pending[reasoning] = text[len(body):]
        return body
