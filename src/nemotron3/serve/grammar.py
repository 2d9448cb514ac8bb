"""Structured output: `response_format` json_object / json_schema and forced tool calls (tool_choice required or a
named function) enforced by grammar-constrained decoding with llguidance (Microsoft's Rust engine behind
guidance, also used by vLLM and SGLang; MIT; no Python dependencies; measured on this CPU with a 256-token vocab:
~10 ms to compile a JSON schema, ~9 us per token mask; xgrammar was ~2 us but brings triton and transformers as
run-time dependencies). See bench/grammar_libs.py.

`Constraint` is the engine's Request.grammar: fork() per sample, mask(ahead) -> (V,) bool of allowed tokens,
advance(token). With reasoning on, the grammar starts after "</think>": until the output closes its thought every
token is allowed, then up to two blank tokens (the "\n\n" after it) pass before the grammar's text. Tool calls: a
Lark grammar of Nemotron 3's XML format over the allowed functions; with `strict` each parameter's value follows its
JSON-schema type (strings are raw text of at most MAX_RAW_VALUE characters, other values JSON); under
tool_choice=auto with a strict tool, the grammar is free text without '<' optionally followed by calls; a byte-level
template's end-of-turn text may follow the calls. Vocabularies: the byte tokenizer's, or a Hugging Face
tokenizer.json handed to llguidance whole.
"""

from __future__ import annotations

import json

import torch

from ..infer.reasoning import THINK_CLOSE
from ..tokenizer import ByteTokenizer


def _llg():
    try:
        import llguidance
        import llguidance.torch
    except ImportError:
        raise ImportError("structured output needs llguidance: pip install llguidance") from None
    return llguidance


_TOKENIZERS: dict = {}
EOS = 0                                                      # the byte tokenizer's end of text


def _ll_tokenizer(tokenizer, vocab_size: int):
    """The llguidance view of a tokenizer: for bytes, token i is byte i and token 0 (NUL) the end of text; a
    Hugging Face tokenizer.json is handed over whole (its byte-level vocabulary and special tokens)."""
    llg = _llg()
    key = "bytes" if isinstance(tokenizer, ByteTokenizer) else id(tokenizer)
    if key in _TOKENIZERS:
        return _TOKENIZERS[key]
    if isinstance(tokenizer, ByteTokenizer):
        class Bytes:
            eos_token_id, bos_token_id, special_token_ids = EOS, None, [EOS]
            tokens = [b"\xff[EOS]"] + [bytes([i]) for i in range(1, 256)]     # 0xFF marks a special token

            def __call__(self, s):
                return list(s)
        _TOKENIZERS[key] = llg.LLTokenizer(llg.TokenizerWrapper(Bytes()))
    elif hasattr(tokenizer, "tok") and hasattr(tokenizer.tok, "to_str") and tokenizer.eos_token_id is not None:
        _TOKENIZERS[key] = llg.LLTokenizer(tokenizer.tok.to_str(), n_vocab=vocab_size,
                                           eos_token=tokenizer.eos_token_id)
    else:
        raise ValueError("structured output needs the byte tokenizer or a tokenizer.json with an eos_token in its "
                         "tokenizer_config.json; drop response_format or use tool_choice=auto.")
    return _TOKENIZERS[key]


class Constraint:
    def __init__(self, tokenizer, grammar: str, vocab_size: int, thinking: bool):
        llg = _llg()
        self.tok, self.grammar, self.V, self.thinking = tokenizer, grammar, vocab_size, thinking
        self.matcher = llg.LLMatcher(_ll_tokenizer(tokenizer, vocab_size), grammar, log_level=0)
        self.eos = tokenizer.eos_token_id
        if self.matcher.is_error():
            raise ValueError(f"the grammar for this request is invalid: {self.matcher.get_error()}")
        self.active, self.tail = not thinking, ""
        self.leading = 2             # before the grammar's text, up to 2 blank tokens pass through (the "\n\n" that
        self.bitmask = llg.torch.allocate_token_bitmask(1, vocab_size)   # follows </think>); 0 once text has begun

    def fork(self) -> Constraint:
        return Constraint(self.tok, self.grammar, self.V, self.thinking)

    def _opens(self, token: int) -> bool:
        """Whether this token completes "</think>" (the grammar starts after it)."""
        self.tail = (self.tail + self.tok.decode([token]))[-len(THINK_CLOSE):]
        return self.tail == THINK_CLOSE

    def mask(self, ahead: list[int]) -> torch.Tensor | None:
        llg = _llg()
        if not self.active:
            tail, k = self.tail, 0
            for k, t in enumerate(ahead, 1):                    # drafts may close the thought
                if self._opens(t):
                    break
            else:
                self.tail = tail
                return None
            self.tail = tail
            ahead = ahead[k:]
            m = self.matcher.deep_copy()
        else:
            m = self.matcher
        leading = self.leading if m is self.matcher else 2
        while leading and ahead and self._blank(ahead[0]):
            ahead, leading = ahead[1:], leading - 1
        leading = leading if not ahead else 0
        n = m.try_consume_tokens(ahead) if ahead else 0
        # a position after a draft the grammar rejects, or after the end of text, is never reached: it stays
        # unconstrained (an empty mask would make its probabilities NaN and fail the whole row)
        reachable = n == len(ahead) and self.eos not in ahead
        if reachable:
            llg.torch.fill_next_token_bitmask(m, self.bitmask, 0)
        if m is self.matcher and n:
            m.rollback(n)                                       # drafts are looked ahead, never committed here
        if not reachable:
            return None
        bits = self.bitmask[0]
        allowed = ((bits[:, None] >> torch.arange(32, dtype=torch.int32)) & 1).bool().reshape(-1)[:self.V]
        if leading:
            allowed = allowed | self._blanks()
        return allowed

    def _blank(self, token: int) -> bool:
        return token != self.eos and token < self.V and self.tok.decode([token]) in ("\n", " ", "\n\n")

    def _blanks(self) -> torch.Tensor:
        if not hasattr(self, "_blank_mask"):
            self._blank_mask = torch.tensor([self._blank(t) for t in range(self.V)])
        return self._blank_mask

    def advance(self, token: int) -> None:
        if not self.active:
            self.active = self._opens(token)
            return
        if self.leading and self._blank(token):
            self.leading -= 1
            return
        self.leading = 0
        self.matcher.consume_token(token)


MAX_RAW_VALUE = 96


def json_grammar(schema: dict) -> str:
    llg = _llg()
    return llg.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})


def _value_rule(schema: dict, strict: bool) -> str:
    """One parameter value: raw text on one line of at most MAX_RAW_VALUE characters (so a model that never ends
    the line cannot hold the call open until max_tokens), or with `strict` and a non-string type, JSON of its
    schema."""
    kind = schema.get("type") if strict else None
    if kind is None or kind == "string":
        return f"/[^<\\n]{{1,{MAX_RAW_VALUE}}}/"
    return f"%json {json.dumps(schema)}"


def tool_call_grammar(tools: list[dict], choice, end_of_turn: str | None = None) -> str:
    """Lark: one or more calls in the XML format, restricted to the named function when tool_choice names one;
    for tool_choice=auto (strict tools), text without '<' optionally followed by calls. end_of_turn: the template's
    end-of-turn text (a byte-level model writes it; the engine stops on it) allowed after the calls."""
    allowed = [t for t in tools if choice in ("required", "auto") or t["name"] == choice["name"]]
    rules, alts = [], []
    for k, t in enumerate(allowed):
        props = t["parameters"].get("properties", {}) or {}
        required = set(t["parameters"].get("required", []) or [])
        parts = []
        for j, (p, sch) in enumerate(props.items()):
            body = _value_rule(sch if isinstance(sch, dict) else {}, t["strict"])
            rules.append(f"p{k}_{j}: \"<parameter={p}>\\n\" {body} \"\\n</parameter>\\n\"")
            parts.append(f"p{k}_{j}" + ("" if p in required else "?"))
        rules.append(f"f{k}: \"<function={t['name']}>\\n\" {' '.join(parts)} \"</function>\\n\"")
        alts.append(f"f{k}")
    rules.append(f"call: \"<tool_call>\\n\" ({' | '.join(alts)}) \"</tool_call>\"")
    calls = "call (\"\\n\" call)*"
    start = f"/[^<]*/ | /[^<]*/ {calls}" if choice == "auto" else calls
    if end_of_turn:
        start = f"({start}) \"\\n\"? {json.dumps(end_of_turn)}?"
    return f"start: {start}\n" + "\n".join(rules)


def attach_grammars(parsed, tokenizer, vocab_size: int) -> None:
    """Give each engine request of a parsed chat body its Constraint (raises ValueError for an unusable schema)."""
    if parsed.tools and (parsed.tool_choice != "auto" or parsed.response_format is None):
        grammar = llg_lark(tool_call_grammar(parsed.tools, parsed.tool_choice, getattr(tokenizer, "end_of_turn", None)))
    elif parsed.response_format["type"] == "json_object":
        grammar = json_grammar({"type": "object"})
    else:
        grammar = json_grammar(parsed.response_format["schema"])
    end_of_turn = getattr(tokenizer, "end_of_turn", None)
    for r in parsed.requests:
        r.grammar = Constraint(tokenizer, grammar, vocab_size, r.thinking)
        if not parsed.tools:         # a JSON grammar ends the output itself (then eos): a turn-end stop string would
            r.stop = [s for s in r.stop if s != end_of_turn]    # only cut a thought that writes it before </think>


def llg_lark(lark: str) -> str:
    return _llg().LLMatcher.grammar_from_lark(lark)
