"""Supervised fine-tuning on conversations: loss on assistant tokens only, budget-control augmentation, packed rows,
token-level or per-conversation loss normalisation, exact resume.

    nemotron3 sft --model runs/demo/final --data builtin --out runs/sft
    nemotron3 sft --model runs/demo/final --data chats.jsonl --out runs/sft --loss-norm conversation
    nemotron3 sft --model runs/demo/final --data builtin --out runs/sft --max-steps 1200 --resume

Per step (NANO §3.1.5-3.1.6, SUPER §3.1):
    token:         L = sum_t l_t / |targets in the batch|                           (Nano, Super stage 1)
    conversation:  L = (1/|B|) sum_c (1/|O_c|) sum_{t in O_c} l_t   via per-token weights  (Super stage 2)
    plus lambda/D sum_k L_k for the MTP depths the model has, normalised the same way.
Written against the current pretraining helpers (make_optimizer, WSDSchedule, save/load_checkpoint); MoE expert
balancing, gradient accumulation and data parallelism are left to the shared trainer this loop will move into.
Rows carry position_ids that restart per conversation; for a model whose forward does not take them yet, each row
holds one conversation (right-padded), so that no conversation sees another.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

from .chat import IGNORE_INDEX, PackedConversations, PackingConfig, load_conversations
from .checkpointing import list_checkpoints, load_checkpoint, save_checkpoint
from .pretrain import make_optimizer
from .schedule import WSDSchedule


@dataclass
class SFTConfig:
    model: str = ""
    """Checkpoint directory to fine-tune (tokenizer.json beside it is used; else bytes)."""
    preset: str = ""
    """Start from random weights of a preset instead of --model (for trying the pipeline)."""
    data: str = "builtin"
    """Conversations: a .jsonl of {"messages": [...]}, a saved `datasets` directory, or 'builtin'."""
    out: str = "runs/sft"
    """Run directory: metrics.jsonl, checkpoints/step_N/, final/."""
    max_steps: int = 900
    seq_len: int = 576
    """Tokens per packed row (the built-in set's longest conversation is ~525 bytes)."""
    batch_size: int = 8
    """Rows per step."""
    lr: float = 3e-3
    """Peak learning rate (WSD: warmup, constant, minus-sqrt decay over the last decay_fraction). The default suits
    the tiny demo model; NVIDIA fine-tuned Nano at 5e-5 and Super at 1e-5."""
    warmup_steps: int = 10
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    reasoning_off_share: float = 0.10
    """Share of reasoning samples trained with the reasoning stripped (Nano 3: 0.10)."""
    truncate_share: float = 0.03
    """Share whose reasoning is cut at a random budget and force-closed (Nano 3: 0.03)."""
    mask_forced_close: bool = False
    """Keep the forced '.\\n</think>\\n\\n' of truncated samples out of the loss (Ultra)."""
    loss_norm: str = "token"
    """token (global mean over target tokens) or conversation (mean of per-conversation means)."""
    mtp_lambda: float = 0.3
    """MTP loss weight; the model's MTP depths are trained when it has MTP heads."""
    mtp_depths: int = 2
    builtin_size: int = 20000
    """Conversations in the built-in training set."""
    heldout: int = 200
    """Held-out conversations (built-in: a separate stream; a file: its last ones) for the eval loss."""
    eval_every: int = 100
    save_every: int = 100
    keep_last: int = 2
    seed: int = 0
    resume: bool = False
    """Continue from the newest checkpoint in --out."""
    device: str = "auto"
    """auto, cpu or cuda."""

    def __post_init__(self):
        if bool(self.model) == bool(self.preset):
            raise ValueError("give exactly one of --model DIR (a checkpoint) or --preset NAME (random weights).")
        for name in ("max_steps", "seq_len", "batch_size", "eval_every", "save_every", "keep_last", "builtin_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} must be >= 1.")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device {self.device}: use auto, cpu or cuda.")

    def packing(self, pack: bool = True) -> PackingConfig:
        return PackingConfig(seq_len=self.seq_len, batch_size=self.batch_size, seed=self.seed,
                             reasoning_off_share=self.reasoning_off_share, truncate_share=self.truncate_share,
                             mask_forced_close=self.mask_forced_close, loss_norm=self.loss_norm, pack=pack)


def load_data(cfg: SFTConfig):
    """(train conversations, held-out conversations)."""
    if cfg.data == "builtin":
        from .sft_data import builtin_conversations
        return (builtin_conversations(cfg.builtin_size, cfg.seed, "train"),
                builtin_conversations(cfg.heldout, cfg.seed, "heldout"))
    convs = load_conversations(cfg.data)
    n_eval = min(cfg.heldout, len(convs) // 10)
    return convs[:len(convs) - n_eval], convs[len(convs) - n_eval:]


def weighted_ce(logits, labels, weights, shift: int):
    """sum_t w[t + shift] * CE(logits[t], labels[t + shift]): the per-conversation-normalised loss."""
    y, w = labels[:, shift:], weights[:, shift:]
    lp = F.log_softmax(logits[:, :logits.shape[1] - shift].float(), dim=-1)          # (b, L - shift, V)
    nll = -lp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)                   # (b, L - shift)
    return (nll * w * (y != IGNORE_INDEX)).sum()


def sft_loss(model, batch: dict, cfg: SFTConfig, mtp_depths: int, packed: bool):
    """(total loss, main loss) of one batch."""
    kw = {"position_ids": batch["position_ids"]} if packed else {}
    if batch["loss_weights"] is None:
        out = model(batch["input_ids"], labels=batch["labels"], mtp_depths=mtp_depths, **kw)
        mtp = sum(out.mtp_losses) if mtp_depths else 0.0
        return out.loss + cfg.mtp_lambda / max(mtp_depths, 1) * mtp, out.loss
    out = model(batch["input_ids"], mtp_depths=mtp_depths, **kw)
    main = weighted_ce(out.logits, batch["labels"], batch["loss_weights"], 1)
    mtp = sum(weighted_ce(lg, batch["labels"], batch["loss_weights"], k + 2) for k, lg in enumerate(out.mtp_logits))
    return main + cfg.mtp_lambda / max(mtp_depths, 1) * mtp, main


@torch.no_grad()
def eval_loss(model, data: PackedConversations, cfg: SFTConfig, packed: bool, batches: int = 4) -> float:
    """Mean main loss over the first `batches` batches of the held-out rows (no augmentation, no MTP)."""
    model.eval()
    rows, B = data.rows(0)[:batches * cfg.batch_size], cfg.batch_size
    losses = [sft_loss(model, _to(data.collate(rows[i:i + B]), model), cfg, 0, packed)[1].item()
              for i in range(0, len(rows), B)]
    model.train()
    return sum(losses) / len(losses)


def _to(batch: dict, model) -> dict:
    dev = model.lm_head.weight.device
    return {k: (v.to(dev) if v is not None else None) for k, v in batch.items()}


def train_sft(cfg: SFTConfig, log=print) -> str:
    """Run (or resume) fine-tuning; returns the final model directory."""
    from .. import NemotronForCausalLM, from_preset
    from ..tokenizer import load_tokenizer
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible; use --device cpu.")
    device = torch.device("cuda" if use_cuda else "cpu")
    torch.manual_seed(cfg.seed)
    model = (NemotronForCausalLM.from_pretrained(cfg.model) if cfg.model else
             NemotronForCausalLM(from_preset(cfg.preset))).to(device).train()
    tok = load_tokenizer(cfg.model or None, model.config.vocab_size)
    mtp_depths = cfg.mtp_depths if model.mtp is not None else 0
    packed = "position_ids" in inspect.signature(model.forward).parameters
    if not packed:
        log("note: this model's forward takes no position_ids yet, so each row holds one conversation (padded).")
    train_convs, heldout_convs = load_data(cfg)
    data = PackedConversations(train_convs, tok, cfg.packing(pack=packed), log=log)
    heldout = PackedConversations(heldout_convs, tok, PackingConfig(
        seq_len=cfg.seq_len, batch_size=1, seed=cfg.seed, reasoning_off_share=0.0, truncate_share=0.0,
        loss_norm=cfg.loss_norm, pack=packed), log=lambda *_: None) if heldout_convs else None
    optimizer = make_optimizer(model, cfg)
    decay_start = cfg.max_steps - round(cfg.max_steps * cfg.decay_fraction)
    schedule = WSDSchedule(cfg.lr, cfg.max_steps, min(cfg.warmup_steps, decay_start), cfg.decay_fraction, 0.01,
                           "minus_sqrt")
    os.makedirs(cfg.out, exist_ok=True)
    step = 0
    if cfg.resume:
        ckpts = list_checkpoints(cfg.out)
        if not ckpts:
            raise ValueError(f"--resume: no checkpoint in {cfg.out}/checkpoints; start without --resume.")
        state = load_checkpoint(ckpts[-1][1], model, optimizer)
        data.load_state_dict(state["data"])
        step = state["step"]
        _keep_metrics_until(os.path.join(cfg.out, "metrics.jsonl"), step)
        log(f"resumed from {ckpts[-1][1]} at step {step}")
    with open(os.path.join(cfg.out, "metrics.jsonl"), "a") as metrics:
        while step < cfg.max_steps:
            lr = schedule(step)
            for g in optimizer.param_groups:
                g["lr"] = lr
            t0 = time.perf_counter()
            batch = _to(data.next_batch(), model)
            loss, main = sft_loss(model, batch, cfg, mtp_depths, packed)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            if not (math.isfinite(loss.item()) and math.isfinite(grad_norm)):
                raise FloatingPointError(f"step {step}: loss {loss.item()} / gradient norm {grad_norm} is not finite; "
                                         f"lower --lr.")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            record = dict(step=step, loss=main.item(), total_loss=loss.item(), lr=lr, grad_norm=grad_norm,
                          targets=int((batch["labels"] != IGNORE_INDEX).sum()),
                          tokens_per_s=batch["input_ids"].numel() / (time.perf_counter() - t0))
            if heldout is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                record["eval_loss"] = eval_loss(model, heldout, cfg, packed)
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            if step % 10 == 0 or step == cfg.max_steps or "eval_loss" in record:
                log(f"step {step}/{cfg.max_steps} loss {record['loss']:.4f} lr {lr:.2e} "
                    f"{record['tokens_per_s']:.0f} tok/s" + (f" eval {record['eval_loss']:.4f}"
                                                              if "eval_loss" in record else ""))
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                save_checkpoint(cfg.out, step, model, optimizer, {"data": data.state_dict(), "config": asdict(cfg)},
                                cfg.keep_last)
    final = os.path.join(cfg.out, "final")
    model.save_pretrained(final)
    for name in ("tokenizer.json", "tokenizer_config.json"):          # the fine-tuned model keeps its tokenizer
        if cfg.model and os.path.exists(os.path.join(cfg.model, name)):
            shutil.copy(os.path.join(cfg.model, name), final)
    return final


def _keep_metrics_until(path: str, last_step: int) -> None:
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def _field_docs() -> dict:
    """The docstrings under SFTConfig's fields, for --help."""
    import ast
    body, docs = ast.parse(inspect.getsource(SFTConfig)).body[0].body, {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = b.value.value
    return docs


def main(argv=None):
    p = argparse.ArgumentParser(prog="nemotron3 sft", description=__doc__.split("\n")[0])
    doc = _field_docs()
    for f in fields(SFTConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action="store_true", help=doc.get(f.name, ""))
        else:
            p.add_argument(flag, type={"int": int, "float": float}.get(f.type, str), default=f.default,
                           help=f"{doc.get(f.name, '')} (default {f.default})")
    args = vars(p.parse_args(argv))
    try:
        cfg = SFTConfig(**args)
        cfg.packing()
    except ValueError as e:                     # PackingConfig names fields; say them as flags
        msg = str(e)
        for f in fields(SFTConfig):
            msg = msg.replace(f"{f.name}=", f"--{f.name.replace('_', '-')} ")
        raise ValueError(msg) from None
    print(f"final model: {train_sft(cfg)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
