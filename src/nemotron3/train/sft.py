"""Supervised fine-tuning on conversations, on the shared Trainer (trainer.py: AdamW + WSD, accumulation, clipping,
MoE balancing, MTP loss, evaluation, atomic checkpoints with exact resume, torchrun data parallelism, metrics,
plots): loss on assistant tokens only, budget-control augmentation, conversations packed into rows and kept apart.

    nemotron3 sft --model runs/demo/final --data builtin --out runs/sft
    nemotron3 sft --model runs/demo/final --data chats.jsonl --out runs/sft --loss-norm conversation
    nemotron3 sft --model runs/demo/final --data builtin --out runs/sft --max-steps 1200 --resume

Per step (Nano / Super SFT):
    token:         L = sum_t l_t / |targets in the step|                                  (Nano, Super stage 1)
    conversation:  L = (1/|B|) sum_c (1/|O_c|) sum_{t in O_c} l_t, over the step's conversations (Super stage 2)
    plus lambda/D sum_k L_k for the MTP depths (MTP stays on in SFT), normalised the same way.
The data side (rendering, masks, augmentation, packing) is chat.py; the loss and its normalisation are LMLoss.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

from .chat import PackedConversations, PackingConfig, load_conversations
from .lm_loss import LMLoss
from .trainer import Trainer, TrainerConfig, build_model, config_flags, data_parallel_rank, distributed, \
    resolve_device


@dataclass
class SFTConfig(TrainerConfig):
    """SFT's run settings: the trainer's plus its data."""
    data: str = "builtin"
    """Conversations: a .jsonl of {"messages": [...]}, a saved `datasets` directory, or 'builtin'."""
    out: str = "runs/sft"
    """Run directory: metrics.jsonl, checkpoints/step_N/, final/."""
    max_steps: int = 900
    """Optimizer steps of the whole run (the WSD decay ends here)."""
    seq_len: int = 576
    """Tokens per packed row (the built-in set's longest conversation is ~525 bytes)."""
    warmup_steps: int = 10
    reasoning_off_share: float = 0.10
    """Share of reasoning samples trained with the reasoning stripped (Nano 3: 0.10)."""
    truncate_share: float = 0.03
    """Share whose reasoning is cut at a random budget and force-closed (Nano 3: 0.03)."""
    mask_forced_close: bool = False
    """Keep the forced '.\\n</think>\\n\\n' of truncated samples out of the loss (Ultra)."""
    loss_norm: str = "token"
    """token (global mean over target tokens) or conversation (mean of per-conversation means); sets the
    trainer's loss normalisation (token / sequence)."""
    builtin_size: int = 20000
    """Conversations in the built-in training set."""
    heldout: int = 200
    """Held-out conversations (built-in: a separate stream; a file: its last ones) for the eval loss."""
    eval_every: int = 100
    save_every: int = 100

    def validate(self) -> None:
        if self.loss_norm not in ("token", "conversation"):
            raise ValueError(f"--loss-norm {self.loss_norm!r}; use 'token' or 'conversation'.")
        self.loss_normalization = {"token": "token", "conversation": "sequence"}[self.loss_norm]
        super().validate()
        for name in ("seq_len", "builtin_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} must be >= 1.")

    def packing(self, augment: bool = True) -> PackingConfig:
        try:
            return PackingConfig(seq_len=self.seq_len, batch_size=self.batch_size, seed=self.seed,
                                 reasoning_off_share=self.reasoning_off_share if augment else 0.0,
                                 truncate_share=self.truncate_share if augment else 0.0,
                                 mask_forced_close=self.mask_forced_close)
        except ValueError as e:                     # PackingConfig names fields; say them as flags
            field, rest = str(e).split("=", 1)
            raise ValueError(f"--{field.replace('_', '-')} {rest}") from None


def load_data(cfg: SFTConfig):
    """(train conversations, held-out conversations)."""
    if cfg.data == "builtin":
        from .sft_data import builtin_conversations
        return (builtin_conversations(cfg.builtin_size, cfg.seed, "train"),
                builtin_conversations(cfg.heldout, cfg.seed, "heldout"))
    convs = load_conversations(cfg.data)
    n_eval = min(cfg.heldout, len(convs) // 10)
    return convs[:len(convs) - n_eval], convs[len(convs) - n_eval:]


class ConversationBatches:
    """The trainer's micro-batch iterator over packed conversations (position = PackedConversations')."""

    def __init__(self, data: PackedConversations):
        self.data = data

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return {k: v for k, v in self.data.next_batch().items() if v is not None}

    def state_dict(self) -> dict:
        return self.data.state_dict()

    def load_state_dict(self, d: dict) -> None:
        self.data.load_state_dict(d)


def train_sft(cfg: SFTConfig, log=None) -> str:
    """Run (or resume) fine-tuning; returns the final model directory. log: one line per step, or None for a
    progress bar."""
    cfg.validate()
    rank, _ = distributed()
    model, tok = build_model(cfg, device=resolve_device(cfg))
    quiet = lambda *_: None                                                          # noqa: E731
    train_convs, heldout_convs = load_data(cfg)
    data = PackedConversations(train_convs, tok, cfg.packing(), *data_parallel_rank(cfg),
                               log=(log or print) if rank == 0 else quiet)
    evaluation = None
    if heldout_convs:
        held = PackedConversations(heldout_convs, tok, cfg.packing(augment=False), log=quiet)
        rows, B = held.rows(0)[:cfg.eval_batches * cfg.batch_size], cfg.batch_size
        batches = [{k: v for k, v in held.collate(rows[i:i + B]).items() if v is not None}
                   for i in range(0, len(rows), B)]
        evaluation = lambda: batches                                                  # noqa: E731
    tokenizer_files = [os.path.join(cfg.model, f) for f in ("tokenizer.json", "tokenizer_config.json")
                       if cfg.model and os.path.exists(os.path.join(cfg.model, f))]
    trainer = Trainer(cfg, model, LMLoss.from_config(cfg, model), log)
    return trainer.train(ConversationBatches(data), evaluation, tokenizer_files)


def main(argv=None):
    p = argparse.ArgumentParser(prog="nemotron3 sft", description=__doc__.split("\n")[0])
    config_flags(p, SFTConfig)
    cfg = SFTConfig(**vars(p.parse_args(argv)))
    final = train_sft(cfg)
    if int(os.environ.get("RANK", 0)) == 0:                 # rank 0 speaks
        print(f"final model: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
