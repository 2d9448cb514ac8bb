"""Conversation data for supervised fine-tuning: loading and validation, rendering through the tokenizer's chat
template, loss masks, budget-control augmentation, and packing into rows whose order resumes exactly.

Records: a .jsonl of {"messages": [...], "tools": [...]?} (OpenAI style: system / user / assistant / tool roles,
assistant `reasoning_content` or an inline <think>...</think>, `tool_calls`), or a Hugging Face dataset saved to disk
with a `messages` column (and optionally `tools`; store tool-call `arguments` as JSON strings there, since datasets
unifies the keys of dicts across rows). A bad record raises DataError with file:line (or row) and the field.

Loss mask: a token is trained on iff it lies in an assistant turn after the generation prompt the inference side
adds itself ("<|im_start|>assistant\\n<think>\\n", or "...<think></think>" for a reasoning-off turn) up to and
including the end-of-turn marker: reasoning, answer, tool calls and "<|im_end|>". System, user and tool tokens, and
the newline after "<|im_end|>", are never trained on. The spans come from the template itself (assistant_spans),
so a checkpoint's own Jinja template works as well as the built-in one; an earlier turn that
truncate_history_thinking shows without its thought ("<think></think>\\nanswer") is trained on in that form.

Budget control (Nano 3 SFT, NANO §3.1.5): each conversation with reasoning is, with probability
reasoning_off_share, stripped of all reasoning (rendered "<think></think>answer"), or, with probability
truncate_share, has one final-answer turn's reasoning cut after a uniform random number of tokens in [0, n) and
closed with the ".\\n</think>\\n\\n" the inference engine forces at a budget, followed by the original answer.
mask_forced_close keeps those forced tokens out of the loss (Ultra's choice). Draws depend on (seed, epoch, index).

Packing: each epoch shuffles the conversations (seed, epoch), and places them first-fit into rows of seq_len tokens,
with at most `pack_window` rows open; position_ids restart at 0 at each conversation (and at the padding).
Conversations longer than seq_len are dropped, and the count is logged; an epoch's ragged last batch is dropped.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from ..chat_format import END_OF_TURN, FORCED_THINK_CLOSE, normalize_messages
from .data import DataError, open_hf_dataset, read_jsonl

IGNORE_INDEX = -100


@dataclass
class Conversation:
    messages: list[dict]
    """Normalised messages (chat_format.normalize_messages)."""
    tools: list[dict] | None = None
    """Function schemas listed in the system prompt."""
    source: str = ""
    """Where it came from ("chats.jsonl:12"), for error messages."""


# ---- loading ----
def conversation_from_record(record, source: str) -> Conversation:
    """One {"messages": [...], "tools": [...]?} record, validated; DataError names source and field."""
    if not isinstance(record, dict) or "messages" not in record:
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{source}: expected an object with a 'messages' list (found {found}).")
    try:
        messages, tools = normalize_messages(record["messages"], record.get("tools"))
    except ValueError as e:
        raise DataError(f"{source}: {e}") from None
    return Conversation(messages, tools, source)


def load_conversations(path: str) -> list[Conversation]:
    """All conversations of a .jsonl file or a saved Hugging Face dataset directory."""
    if os.path.isdir(path):
        ds = open_hf_dataset(path, "messages")
        return [conversation_from_record({k: v for k, v in row.items() if k in ("messages", "tools")},
                                         f"{path}: row {i}") for i, row in enumerate(ds)]
    if not path.endswith(".jsonl"):
        raise DataError(f"{path}: conversations must be a .jsonl file or a dataset directory (save_to_disk).")
    convs = [conversation_from_record(obj, f"{path}:{lineno}") for lineno, obj in read_jsonl(path)]
    if not convs:
        raise DataError(f"{path}: no conversations (only blank lines).")
    return convs


# ---- rendering and loss masks ----
@dataclass
class EncodedConversation:
    input_ids: np.ndarray
    """(n,) token ids of the rendered conversation."""
    loss_mask: np.ndarray
    """(n,) bool: True where the token is a training target."""


def assistant_spans(conv: Conversation, tokenizer) -> tuple[str, list[tuple[int, int, int]]]:
    """The rendered text and, per assistant message i, (i, start, end): the characters trained on (module
    docstring). The generation prompts (thinking on and off) are read off the template by rendering the messages
    before the first assistant turn with and without one; each assistant turn then starts after the next
    occurrence of either, and ends with the end-of-turn marker. Searching forward, rather than rendering each
    turn's prefix, keeps working when a later user message changes how earlier turns render (history thinking)."""
    render = tokenizer.apply_chat_template
    text = render(conv.messages, tools=conv.tools, add_generation_prompt=False)
    end_marker = getattr(tokenizer, "eos_token", None) or END_OF_TURN
    first = next(i for i, m in enumerate(conv.messages) if m["role"] == "assistant")
    before = render(conv.messages[:first], tools=conv.tools, add_generation_prompt=False)
    prompts = [render(conv.messages[:first], tools=conv.tools, add_generation_prompt=True, enable_thinking=thinking)
               for thinking in (True, False)]
    if not text.startswith(before) or not all(p.startswith(before) and len(p) > len(before) for p in prompts):
        raise DataError(f"{conv.source}: the chat template does not render the turns before the first assistant "
                        f"message as a prefix of the conversation (or adds no generation prompt); cannot find "
                        f"the assistant turns to train on.")
    headers = sorted({p[len(before):] for p in prompts}, key=len, reverse=True)
    spans, cursor = [], len(before)
    for i, m in enumerate(conv.messages):
        if m["role"] != "assistant":
            continue
        found = [(text.find(h, cursor), h) for h in headers if text.find(h, cursor) >= 0]
        at, header = min(found, key=lambda f: f[0]) if found else (-1, "")     # ties: the longer header (sorted)
        end = text.find(end_marker, at + len(header)) if at >= 0 else -1
        if end < 0:
            raise DataError(f"{conv.source}: cannot find assistant message {i} in the rendering (no {headers[0]!r} "
                            f"... {end_marker!r} after the previous turn).")
        spans.append((i, at + len(header), end + len(end_marker)))
        cursor = end + len(end_marker)
    return text, spans


def encode_conversation(conv: Conversation, tokenizer, unmasked_close: int | None = None) -> EncodedConversation:
    """Token ids and loss mask. unmasked_close: index of an assistant message whose reasoning was cut at a budget;
    its forced ".\\n</think>\\n\\n" is kept out of the loss."""
    text, spans = assistant_spans(conv, tokenizer)
    ids, starts = tokenizer.encode_with_offsets(text)
    char_mask = np.zeros(len(text) + 1, dtype=bool)
    for i, s, e in spans:
        char_mask[s:e] = True
        if i == unmasked_close:
            at = text.find(FORCED_THINK_CLOSE, s, e)
            if at < 0:
                raise DataError(f"{conv.source}: the template did not render the forced {FORCED_THINK_CLOSE!r} of "
                                f"message {i}; turn mask_forced_close off for this template.")
            char_mask[at:at + len(FORCED_THINK_CLOSE)] = False
    return EncodedConversation(np.asarray(ids, dtype=np.int64), char_mask[np.asarray(starts, dtype=np.int64)])


def labels_for(enc: EncodedConversation) -> np.ndarray:
    """The model's labels: the ids, with IGNORE_INDEX where there is no loss (the model shifts them)."""
    return np.where(enc.loss_mask, enc.input_ids, IGNORE_INDEX)


# ---- budget-control augmentation ----
def augment(conv: Conversation, rng: random.Random, tokenizer, reasoning_off_share: float,
            truncate_share: float) -> tuple[Conversation, str, int | None]:
    """(conversation, kind, truncated message index): kind is 'none', 'reasoning_off' or 'truncated' (module
    docstring). Conversations without reasoning are returned unchanged."""
    msgs = conv.messages
    if not any(m.get("reasoning_content") for m in msgs):
        return conv, "none", None
    u = rng.random()
    if u < reasoning_off_share:
        off = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in msgs]
        return Conversation(off, conv.tools, conv.source), "reasoning_off", None
    if u >= reasoning_off_share + truncate_share:
        return conv, "none", None
    last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=-1)
    # only non-empty final answers after the last user message: history turns lose their thought anyway, and the
    # template trims the "\n\n" after </think> when nothing but tool calls (or nothing at all) follows it
    turns = [i for i, m in enumerate(msgs) if i > last_user and m.get("reasoning_content") and not m.get("tool_calls")
             and m["content"].strip()]
    if not turns:
        return conv, "none", None
    i = rng.choice(turns)
    ids = tokenizer.encode(msgs[i]["reasoning_content"])
    cut = tokenizer.decode(ids[:rng.randrange(len(ids))]).rstrip("\ufffd")       # a byte cut may split a character
    # rendered "<think>\n" + cut + ".\n</think>\n" + "\n" + answer == what the engine emits at a budget
    msgs = [dict(m) for m in msgs]
    msgs[i]["reasoning_content"] = cut + "."
    msgs[i]["content"] = "\n" + msgs[i]["content"]
    return Conversation(msgs, conv.tools, conv.source), "truncated", i


# ---- packing ----
@dataclass
class PackingConfig:
    seq_len: int = 512
    """Tokens per row."""
    batch_size: int = 8
    """Rows per batch on each rank."""
    seed: int = 0
    """Seed of the order and of the augmentation draws."""
    reasoning_off_share: float = 0.10
    """Share of conversations with reasoning trained with it stripped (Nano 3: 10%; Super: 3%)."""
    truncate_share: float = 0.03
    """Share whose final reasoning is cut at a random budget and force-closed (Nano 3: 3%)."""
    mask_forced_close: bool = False
    """Keep the forced '.\\n</think>\\n\\n' of truncated samples out of the loss (Ultra)."""
    pack_window: int = 16
    """Rows kept open for first-fit packing."""
    pack: bool = True
    """False: one conversation per row, right-padded (for a model that cannot keep packed conversations apart)."""

    def __post_init__(self):
        if self.seq_len < 8 or self.batch_size < 1:
            raise ValueError(f"seq_len={self.seq_len} must be >= 8 and batch_size={self.batch_size} >= 1.")
        for name in ("reasoning_off_share", "truncate_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must lie in [0, 1] (a share of the samples).")
        if self.reasoning_off_share + self.truncate_share > 1.0:
            raise ValueError(f"reasoning_off_share + truncate_share = "
                             f"{self.reasoning_off_share + self.truncate_share} exceeds 1; lower one of them.")


class PackedConversations:
    """Batches {"input_ids", "labels", "position_ids"}: (B, T) long (per-conversation loss normalisation is the
    trainer's: LMLoss "sequence" counts each packed conversation from position_ids).
    The position is {"epoch", "batch"} (state_dict / load_state_dict); batch k of an epoch is rows
    [k*B*W + r*B, k*B*W + (r+1)*B) of that epoch's deterministic packing for rank r of W."""

    def __init__(self, conversations: list[Conversation], tokenizer, cfg: PackingConfig, rank: int = 0,
                 world_size: int = 1, log=print):
        self.tok, self.cfg, self.rank, self.world = tokenizer, cfg, rank, world_size
        self.convs, self.base = [], []
        longest, dropped = 0, 0
        for c in conversations:
            enc = encode_conversation(c, tokenizer)
            longest = max(longest, len(enc.input_ids))
            if len(enc.input_ids) > cfg.seq_len:
                dropped += 1
            elif enc.loss_mask.any():
                self.convs.append(c)
                self.base.append(enc)
        if dropped:
            log(f"dropped {dropped} of {len(conversations)} conversations longer than seq_len={cfg.seq_len} tokens "
                f"(longest {longest}); raise --seq-len to keep them.")
        self.pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.epoch, self.batch = 0, 0
        self._plan_epoch, self._rows, self._encoded = None, [], {}
        if len(self.rows(0)) < cfg.batch_size * world_size:
            raise DataError(f"{len(self.convs)} usable conversations fill {len(self._rows)} rows of {cfg.seq_len} "
                            f"tokens, fewer than one global batch of {cfg.batch_size * world_size}; add data or "
                            f"lower --batch-size / --seq-len.")

    def encoded(self, index: int, epoch: int) -> tuple[EncodedConversation, str]:
        """Conversation `index` as trained in `epoch` (augmented by its own draw), and its augmentation kind."""
        rng = random.Random(f"nemotron3-sft-{self.cfg.seed}-{epoch}-{index}")
        conv, kind, cut = augment(self.convs[index], rng, self.tok, self.cfg.reasoning_off_share,
                                  self.cfg.truncate_share)
        if kind == "none":
            return self.base[index], kind
        enc = encode_conversation(conv, self.tok, cut if self.cfg.mask_forced_close else None)
        return (enc, kind) if len(enc.input_ids) <= self.cfg.seq_len else (self.base[index], "none")

    def rows(self, epoch: int) -> list[list[int]]:
        """The epoch's rows (lists of conversation indices), first-fit over a window of open rows."""
        if self._plan_epoch == epoch:
            return self._rows
        order = torch.randperm(len(self.convs), generator=torch.Generator().manual_seed(
            self.cfg.seed * 1_000_003 + epoch)).tolist()
        self._encoded = {}
        rows, open_rows = [], []                     # open_rows: [free tokens, indices]
        for idx in order:
            enc, kind = self.encoded(idx, epoch)
            if kind != "none":
                self._encoded[idx] = enc
            n = len(enc.input_ids)
            slot = next((r for r in open_rows if r[0] >= n), None) if self.cfg.pack else None
            if slot is None:
                slot = [self.cfg.seq_len, []]
                open_rows.append(slot)
                if len(open_rows) > self.cfg.pack_window:
                    rows.append(open_rows.pop(0)[1])
            slot[0] -= n
            slot[1].append(idx)
        rows += [r[1] for r in open_rows]
        self._plan_epoch, self._rows = epoch, rows
        return rows

    def next_batch(self) -> dict:
        B, G = self.cfg.batch_size, self.cfg.batch_size * self.world
        if (self.batch + 1) * G > len(self.rows(self.epoch)):
            self.epoch, self.batch = self.epoch + 1, 0
        rows = self.rows(self.epoch)[self.batch * G + self.rank * B:self.batch * G + (self.rank + 1) * B]
        self.batch += 1
        return self.collate(rows)

    def collate(self, rows: list[list[int]]) -> dict:
        T = self.cfg.seq_len
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
        pos = torch.zeros((len(rows), T), dtype=torch.long)
        for b, row in enumerate(rows):
            t = 0
            for idx in row:
                enc = self._encoded.get(idx) or self.base[idx]
                n = len(enc.input_ids)
                ids[b, t:t + n] = torch.from_numpy(enc.input_ids)
                labels[b, t:t + n] = torch.from_numpy(labels_for(enc))
                pos[b, t:t + n] = torch.arange(n)
                t += n
            pos[b, t:] = torch.arange(T - t)        # padding: its own segment, no loss
        return {"input_ids": ids, "labels": labels, "position_ids": pos}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, d: dict) -> None:
        self.epoch, self.batch = int(d["epoch"]), int(d["batch"])
