"""Pretraining: the built-in corpus or tokenized user documents cut into windows, next-token + MTP loss, on the
shared Trainer (trainer.py: AdamW + WSD, accumulation, clipping, balancing, evaluation, checkpoints with exact
resume, torchrun data parallelism, metrics, plots).

    nemotron3 train --preset tiny --out runs/tiny --max-steps 300 --save-every 100
    nemotron3 train --preset tiny --out runs/tiny --max-steps 600 --save-every 100 --resume
    nemotron3 train --model runs/tiny/final --data corpus.jsonl --seq-len 512 --no-cross-document --out runs/cpt
    nemotron3 train --model runs/tiny/final --mix 65536:0.2,4096:0.8 --batch-size 1 --constant-lr --act-ckpt \
        --out runs/long                                  # the long-context stage (long_context.py)

Per optimizer step (nemotron3_spec.md §2.2, §5.1):
    L = L_main + (lambda / D) sum_k L_k  +  aux_coeff-weighted sequence aux loss summed over MoE layers
    then, after the step, every router's e_score_correction_bias += rate * sign(mean load - load)
Windows run across document boundaries (the usual pretraining packing) unless --no-cross-document, which numbers
the documents of a window by position_ids restarting after each end-of-document token, so attention, Mamba
states, MTP and the loss stay inside each document. --model DIR starts from a saved model and its tokenizer;
--preset starts from fresh weights and the byte tokenizer.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import torch

from ..config import from_preset
from ..infer.speculative import frequent_tokens
from ..model import NemotronForCausalLM
from ..quant import apply_recipe, explain
from .data import PackedWindows, ResumableSampler, builtin_tokens, document_position_ids, load_token_file, \
    tokenize_to_file
from .lm_loss import LMLoss
from .trainer import Trainer, TrainerConfig, build_model, config_flags, data_parallel_rank, distributed, \
    nvfp4_recipe, read_last_metrics, resolve_device  # noqa: F401  read_last_metrics: re-exported for the demo


@dataclass
class TrainConfig(TrainerConfig):
    """Pretraining's run settings: the trainer's plus its data."""
    data: str = ""
    """.txt / .jsonl files (comma-separated) or a tokenized .bin; empty = the built-in corpus."""
    seq_len: int = 256
    """Tokens per training sequence."""
    train_tokens: int = 2_000_000
    """Size of the built-in training corpus in tokens."""
    chat_share: float = 0.0
    """Share of the built-in corpus's documents that are built-in SFT conversations in the chat format (the demo
    uses it so that its SFT needs few steps); 0 = the plain corpus."""
    no_cross_document: bool = False
    """Keep each document to itself inside a window (position_ids restart after every end-of-document token)."""
    mix: str = ""
    """Long-context stage: rows of long and short documents in a ratio, e.g. 65536:0.2,4096:0.8 (LENGTH:SHARE of
    rows; every row holds the longest length, documents kept apart by position_ids; built-in long documents;
    --seq-len and --data are not used). Pair with --constant-lr and --act-ckpt."""
    answer_weight: float = 1.0
    """--mix: loss weight of each long document's answer tokens (the rest weigh 1). A 7-digit answer is ~1% of a
    1K-token document, so retrieval gets little gradient at 1; a tiny model learns it sooner at e.g. 20."""
    long_tasks: str = ""
    """--mix: the long documents' task kinds, comma-separated from train/long_docs.TRAIN_TASKS (empty = all). Fewer
    and shorter kinds (niah_single_1,vt) let --mix lengths go down to 496 tokens."""


def build_data(cfg: TrainConfig, tokenizer):
    if not cfg.data:
        train = builtin_tokens(tokenizer, cfg.train_tokens, cfg.seed, "train", cfg.chat_share)
        n_heldout = max(cfg.seq_len + 1, cfg.eval_batches * cfg.batch_size * (cfg.seq_len + 1))
        heldout = builtin_tokens(tokenizer, n_heldout, cfg.seed, "heldout", cfg.chat_share)
        return PackedWindows(train, cfg.seq_len), PackedWindows(heldout, cfg.seq_len)
    paths = [p for p in cfg.data.split(",") if p]
    if len(paths) == 1 and paths[0].endswith(".bin"):
        tokens = load_token_file(paths[0])
    else:
        os.makedirs(cfg.out, exist_ok=True)
        tokens = load_token_file(tokenize_to_file(paths, tokenizer, os.path.join(cfg.out, "tokens")))
    n_eval = min(len(tokens) // 10, cfg.eval_batches * cfg.batch_size * (cfg.seq_len + 1))
    return (PackedWindows(tokens[:len(tokens) - n_eval], cfg.seq_len),
            PackedWindows(tokens[len(tokens) - n_eval:], cfg.seq_len) if n_eval > cfg.seq_len else None)


class WindowBatches:
    """Pretraining micro-batches: shuffled windows of seq_len + 1 tokens as {input_ids, labels[, position_ids]};
    state_dict / load_state_dict are the sampler's (exact resume)."""

    def __init__(self, windows: PackedWindows, sampler: ResumableSampler | None, batch_size: int,
                 eos_id: int | None = None):
        self.windows, self.sampler, self.batch_size, self.eos_id = windows, sampler, batch_size, eos_id

    def batch(self, indices) -> dict:
        ids = torch.stack([self.windows[i] for i in indices])
        out = {"input_ids": ids, "labels": ids}
        if self.eos_id is not None:
            out["position_ids"] = document_position_ids(ids, self.eos_id)
        return out

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return self.batch(self.sampler.next_batch())

    def in_order(self, n_batches: int) -> list[dict]:
        """The first n_batches batches in order (held-out evaluation)."""
        n = min(len(self.windows), n_batches * self.batch_size)
        return [self.batch(range(s, min(n, s + self.batch_size))) for s in range(0, n, self.batch_size)]

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, d: dict) -> None:
        self.sampler.load_state_dict(d)


@torch.no_grad()
def evaluate(model, windows: PackedWindows, cfg: TrainConfig, mtp_depths: int) -> dict:
    """Held-out loss and accuracies of `model` on the first eval_batches batches of `windows`."""
    loss = LMLoss(mtp_depths, cfg.mtp_lambda, 0.0, cfg.loss_normalization)
    trainer = Trainer(cfg, model, loss, log=lambda *_: None)
    return trainer.evaluate(WindowBatches(windows, None, cfg.batch_size).in_order(cfg.eval_batches))


def train(cfg: TrainConfig, log=None, model_config=None) -> str:
    """Run (or resume) a pretraining run; returns the final model directory. log: a callable taking one line per
    step, or None for a progress bar (tqdm) with loss, tokens/s and ETA. model_config: a NemotronConfig to train
    instead of cfg.preset (the Python API's way to train any architecture, e.g. for ablations)."""
    cfg.validate()
    if cfg.seq_len < 1:
        raise ValueError(f"--seq-len {cfg.seq_len} must be >= 1.")
    if not 0.0 <= cfg.chat_share <= 1.0:
        raise ValueError(f"--chat-share {cfg.chat_share} must lie in [0, 1] (a share of the documents).")
    rank, _ = distributed()
    model, tokenizer = build_model(cfg, model_config, resolve_device(cfg))
    if not cfg.model and model.config.vocab_size > tokenizer.vocab_size and rank == 0:
        (log or print)(f"note: {cfg.preset} has vocab_size {model.config.vocab_size} but trains on the byte "
                       f"tokenizer's 256 ids; start from --model DIR to use a checkpoint's tokenizer.")
    dp_rank, dp_size = data_parallel_rank(cfg)              # tp ranks of one group read the same rows
    if cfg.mix:
        return _train_mix(cfg, model, tokenizer, dp_rank, dp_size, log)
    train_w, eval_w = build_data(cfg, tokenizer)
    if model.mtp is not None:      # the MTP drafter's vocabulary at inference, saved with the model (None: all)
        model.draft_vocab = frequent_tokens(train_w.tokens, model.config.vocab_size)
    sampler = ResumableSampler(len(train_w), cfg.batch_size, seed=cfg.seed, rank=dp_rank, world_size=dp_size)
    eos = tokenizer.eos_token_id if cfg.no_cross_document else None
    trainer = Trainer(cfg, model, LMLoss.from_config(cfg, model), log)
    evaluation = None
    if eval_w is not None:
        held_out = WindowBatches(eval_w, None, cfg.batch_size, eos).in_order(cfg.eval_batches)
        evaluation = lambda: held_out                                          # noqa: E731
    tokenizer_files = _tokenizer_files(cfg)
    return trainer.train(WindowBatches(train_w, sampler, cfg.batch_size, eos), evaluation, tokenizer_files)


def _tokenizer_files(cfg: TrainConfig) -> list[str]:
    """The start model's tokenizer files, copied into every saved model directory."""
    return [os.path.join(cfg.model, f) for f in ("tokenizer.json", "tokenizer_config.json")
            if cfg.model and os.path.exists(os.path.join(cfg.model, f))]


def _train_mix(cfg: TrainConfig, model, tokenizer, rank: int, world: int, log) -> str:
    """The long-context stage (--mix): mixed long / short rows of the built-in long documents (long_context.py)."""
    from .long_context import MixedLengthRows, parse_mix
    from .long_docs import TRAIN_TASKS, check_tasks
    if cfg.data:
        raise ValueError("--mix trains on the built-in long documents; drop --data (or drop --mix).")
    mix = parse_mix(cfg.mix)
    tasks = check_tasks(tuple(cfg.long_tasks.split(","))) if cfg.long_tasks else TRAIN_TASKS
    data = MixedLengthRows(tokenizer, mix, cfg.batch_size, cfg.seed, "train", rank, world, cfg.answer_weight, tasks)
    held_out = MixedLengthRows(tokenizer, mix, cfg.batch_size, cfg.seed, "heldout",
                               tasks=tasks).in_order(cfg.eval_batches)
    trainer = Trainer(cfg, model, LMLoss.from_config(cfg, model), log)
    tokenizer_files = _tokenizer_files(cfg)
    return trainer.train(data, lambda: held_out, tokenizer_files)


def explain_precision(cfg: TrainConfig, model_config=None) -> str:
    """Which format each GEMM layer trains in under cfg (built on the meta device: no memory, no time)."""
    with torch.device("meta"):
        model = NemotronForCausalLM(model_config or from_preset(cfg.preset))
    if cfg.precision != "nvfp4":
        return f"--precision {cfg.precision}: every layer trains in {cfg.precision} (use --precision nvfp4)."
    quant = apply_recipe(model, nvfp4_recipe(cfg))
    return f"{cfg.preset}, --precision nvfp4 (high = fp32 on CPU, bf16 autocast on CUDA):\n" + explain(quant.plan)


def main(argv=None):
    p = argparse.ArgumentParser(prog="nemotron3 train", description=__doc__.split("\n")[0])
    config_flags(p, TrainConfig)
    p.add_argument("--explain", action="store_true", help="print each layer's training format and exit")
    args = vars(p.parse_args(argv))
    show_plan = args.pop("explain")
    cfg = TrainConfig(**args)
    if show_plan:
        print(explain_precision(cfg))
        return 0
    final = train(cfg)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"final model: {final}")


if __name__ == "__main__":
    sys.exit(main())
