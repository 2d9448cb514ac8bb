"""Pretraining loop: AdamW + WSD, gradient clipping and accumulation, MTP loss, MoE balancing, evaluation,
metrics.jsonl, atomic checkpoints with exact resume, and a divergence guard.

    nemotron3 train --preset tiny --out runs/tiny --max-steps 300 --save-every 100
    nemotron3 train --preset tiny --out runs/tiny --max-steps 600 --save-every 100 --resume
    nemotron3 train --preset small --data corpus.jsonl --seq-len 512 --batch-size 8 --precision bf16

Per optimizer step (nemotron3_spec.md §2.2, §5.1):
    L = L_main + (lambda / D) sum_k L_k  +  aux_coeff-weighted sequence aux loss summed over MoE layers
    then, after the step, every router's e_score_correction_bias += rate * sign(mean load - load)
Weight decay applies to matrices only (dim >= 2); norms, biases, A_log, D and dt_bias are not decayed.
Runs unchanged under torchrun (data parallel: gradients averaged with one all-reduce, expert loads summed, rank 0
writes); FSDP2 sharding, the trained demo and the ablations are the pretraining issue's remaining parts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields

import torch

from ..config import from_preset
from ..model import NemotronForCausalLM
from ..model.moe import MoE
from ..quant import NVFP4Recipe, apply_recipe, explain
from .balance import expert_counts, load_stats, sequence_aux_loss, update_expert_bias
from .checkpointing import list_checkpoints, load_checkpoint, save_checkpoint
from .data import PackedWindows, ResumableSampler, builtin_tokens, load_token_file, tokenize_to_file
from .schedule import WSDSchedule


@dataclass
class TrainConfig:
    preset: str = "tiny"
    """Architecture preset (nemotron3 info --list)."""
    out: str = "runs/tiny"
    """Run directory: metrics.jsonl, checkpoints/step_N/, final/."""
    max_steps: int = 300
    """Optimizer steps of the whole run (the WSD decay ends here)."""
    save_every: int = 100
    """Checkpoint every N steps (and at the end)."""
    keep_last: int = 2
    """Checkpoints kept on disk."""
    resume: bool = False
    """Continue from the newest checkpoint in --out."""
    seed: int = 0
    """Seed of the weights, the data order and the built-in corpus."""
    data: str = ""
    """.txt / .jsonl files (comma-separated) or a tokenized .bin; empty = the built-in corpus."""
    precision: str = "fp32"
    """fp32; bf16 (autocast; CUDA, or CPU if it supports it); or nvfp4 (the Nemotron 3 NVFP4 recipe, emulated:
    quantized GEMMs, everything else fp32 on CPU / bf16 autocast on CUDA; see --explain)."""
    nvfp4_high_last: float = 0.15
    """nvfp4: share of the hybrid layers, counted from the end, kept in high precision."""
    nvfp4_mamba_out: str = "mxfp8"
    """nvfp4: format of the Mamba out_proj layers (mxfp8, nvfp4 or high)."""
    nvfp4_no_rht: bool = False
    """nvfp4 ablation: no random Hadamard transform on wgrad."""
    nvfp4_no_sr: bool = False
    """nvfp4 ablation: round gradients to nearest instead of stochastically."""
    nvfp4_no_2d: bool = False
    """nvfp4 ablation: 1x16 weight blocks instead of 16x16 tiles."""
    nvfp4_all: bool = False
    """nvfp4 ablation: every linear layer of the hybrid stack and MTP in NVFP4 (no high-precision exceptions)."""
    device: str = "auto"
    """auto (CUDA if available, else CPU), cpu or cuda; under torchrun each rank takes cuda:LOCAL_RANK."""
    seq_len: int = 256
    """Tokens per training sequence."""
    batch_size: int = 8
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 3e-3
    """Peak learning rate."""
    warmup_steps: int = 20
    decay_fraction: float = 0.2
    """Share of the steps in the WSD decay (minus-sqrt to 1% of the peak)."""
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mtp_depths: int = 2
    """MTP depths trained with the model's MTP block(s) (Super: 2 with one shared block); 0 = off."""
    mtp_lambda: float = 0.3
    """MTP loss weight lambda in L + lambda/D sum_k L_k."""
    bias_rate: float = 1e-3
    """Aux-loss-free expert-bias update rate (0 = off)."""
    aux_coeff: float = 1e-4
    """Sequence-level load-balancing loss coefficient (0 = off)."""
    eval_every: int = 50
    eval_batches: int = 4
    train_tokens: int = 2_000_000
    """Size of the built-in training corpus in tokens."""
    on_nan: str = "stop"
    """stop (keep the last good checkpoint) or skip (drop the step) when the loss or gradient is not finite."""


def build_data(cfg: TrainConfig, tokenizer):
    if not cfg.data:
        train = builtin_tokens(tokenizer, cfg.train_tokens, cfg.seed, "train")
        n_heldout = max(cfg.seq_len + 1, cfg.eval_batches * cfg.batch_size * (cfg.seq_len + 1))
        heldout = builtin_tokens(tokenizer, n_heldout, cfg.seed, "heldout")
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


def make_optimizer(model, cfg: TrainConfig):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def step_loss(model, ids, cfg: TrainConfig, mtp_depths: int):
    """Loss of one micro-batch and what to log about it."""
    out = model(ids, labels=ids, mtp_depths=mtp_depths, return_router=True)
    loss = out.loss
    if mtp_depths:
        loss = loss + cfg.mtp_lambda / mtp_depths * sum(out.mtp_losses)
    if cfg.aux_coeff:
        for r in out.router.values():
            loss = loss + sequence_aux_loss(r.scores_TE, ids.shape[0], r.ids_TK.shape[1], cfg.aux_coeff)
    return loss, out


@torch.no_grad()
def evaluate(model, windows, cfg: TrainConfig, mtp_depths: int) -> dict:
    model.eval()
    n = min(len(windows), cfg.eval_batches * cfg.batch_size)
    losses, accs, mtp_acc = [], [], [[] for _ in range(mtp_depths)]
    for start in range(0, n, cfg.batch_size):
        ids = torch.stack([windows[i] for i in range(start, min(n, start + cfg.batch_size))])
        ids = ids.to(model.lm_head.weight.device)
        out = model(ids, labels=ids, mtp_depths=mtp_depths)
        losses.append(out.loss.item())
        accs.append(out.accuracy.item())
        for k, a in enumerate(out.mtp_accuracies):
            mtp_acc[k].append(a.item())
    model.train()
    res = {"eval_loss": sum(losses) / len(losses), "eval_accuracy": sum(accs) / len(accs)}
    res.update({f"eval_mtp{k + 1}_accuracy": sum(a) / len(a) for k, a in enumerate(mtp_acc)})
    return res


def train(cfg: TrainConfig, log=None, model_config=None) -> str:
    """Run (or resume) a training run; returns the final model directory. log: a callable taking one line per
    step, or None for a progress bar (tqdm) with loss, tokens/s and ETA. model_config: a NemotronConfig to train
    instead of cfg.preset (the Python API's way to train any architecture, e.g. for ablations)."""
    from ..tokenizer import ByteTokenizer
    if cfg.precision not in ("fp32", "bf16", "nvfp4"):
        raise ValueError(f"--precision {cfg.precision}: use fp32, bf16 or nvfp4.")
    if cfg.on_nan not in ("stop", "skip"):
        raise ValueError(f"--on-nan {cfg.on_nan}: use stop or skip.")
    for name in ("max_steps", "save_every", "keep_last", "seq_len", "batch_size", "grad_accum", "eval_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(cfg, name)} must be >= 1.")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device {cfg.device}: use auto, cpu or cuda.")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible; use --device cpu.")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    torch.manual_seed(cfg.seed)
    model = NemotronForCausalLM(model_config or from_preset(cfg.preset)).to(device).train()
    quant = apply_recipe(model, nvfp4_recipe(cfg)) if cfg.precision == "nvfp4" else None
    tokenizer = ByteTokenizer()
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"preset {cfg.preset} has vocab_size {model.config.vocab_size} < 256 byte tokens.")
    mtp_depths = cfg.mtp_depths if model.mtp is not None else 0
    rank, world = _distributed()
    train_w, eval_w = build_data(cfg, tokenizer)
    sampler = ResumableSampler(len(train_w), cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world)
    optimizer = make_optimizer(model, cfg)
    decay_start = cfg.max_steps - round(cfg.max_steps * cfg.decay_fraction)
    schedule = WSDSchedule(cfg.lr, cfg.max_steps, min(cfg.warmup_steps, decay_start),   # short runs: less warmup
                           cfg.decay_fraction, 0.01, "minus_sqrt")
    moe_layers = [m for m in model.modules() if isinstance(m, MoE)]
    step = start_step = 0
    os.makedirs(cfg.out, exist_ok=True)
    if cfg.resume and not list_checkpoints(cfg.out):       # before the progress bar draws anything
        raise ValueError(f"--resume: no checkpoint in {cfg.out}/checkpoints; start without --resume.")
    bar = None
    if rank != 0:
        log = lambda *_: None                                                # noqa: E731  rank 0 speaks
    elif log is None:
        from tqdm import tqdm
        bar = tqdm(total=cfg.max_steps, unit="step", dynamic_ncols=True, mininterval=1.0)
        log = bar.write
    if cfg.resume:
        ckpts = list_checkpoints(cfg.out)
        state = load_checkpoint(ckpts[-1][1], model, optimizer)
        sampler.load_state_dict(state["sampler"])
        step = start_step = state["step"]
        _truncate_metrics(os.path.join(cfg.out, "metrics.jsonl"), step)   # drop steps logged after the checkpoint
        log(f"resumed from {ckpts[-1][1]} at step {step}")
        if bar is not None:
            bar.update(step)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "nvfp4" and device.type == "cuda")
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)
    metrics = open(os.path.join(cfg.out, "metrics.jsonl"), "a") if rank == 0 else open(os.devnull, "w")
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len * world
    t_start = time.perf_counter()
    while step < cfg.max_steps:
        lr = schedule(step)
        for g in optimizer.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        counts = {m.layer_idx: torch.zeros(m.gate.num_experts, dtype=torch.long, device=device) for m in moe_layers}
        total, main_loss, logged = 0.0, 0.0, {}
        quant_step = quant is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps)
        if quant is not None:
            quant.reseed(step, rank)                   # stochastic rounding repeats exactly after a resume
            quant.monitor(quant_step)
        for _ in range(cfg.grad_accum):
            ids = torch.stack([train_w[i] for i in sampler.next_batch()]).to(device, non_blocking=True)
            with autocast:
                loss, out = step_loss(model, ids, cfg, mtp_depths)
            (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
            main_loss += out.loss.item() / cfg.grad_accum
            for i, r in out.router.items():
                if i in counts:
                    counts[i] += expert_counts(r.ids_TK, len(counts[i]))
            logged = {f"mtp{k + 1}_loss": v.item() for k, v in enumerate(out.mtp_losses)}
            logged.update({f"mtp{k + 1}_accuracy": v.item() for k, v in enumerate(out.mtp_accuracies)})
        if world > 1:   # data parallel: average gradients, sum expert loads, average what is logged
            total, main_loss = _all_reduce_grads_and_stats(model, counts, world, total, main_loss)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        if not (math.isfinite(total) and math.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            msg = f"step {step}: loss {total} / gradient norm {grad_norm} is not finite"
            if cfg.on_nan == "stop":
                last = list_checkpoints(cfg.out)
                metrics.close()
                if bar is not None:
                    bar.close()
                raise FloatingPointError(f"{msg}; stopped without writing these weights. Last good checkpoint: "
                                         f"{last[-1][1] if last else 'none'}. Lower --lr or use --on-nan skip.")
            log(msg + "; step skipped (--on-nan skip)")
            step += 1
            continue
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cfg.bias_rate:
            for m in moe_layers:
                update_expert_bias(m.gate.e_score_correction_bias, counts[m.layer_idx], cfg.bias_rate)
        step += 1
        dt = time.perf_counter() - t0
        record = dict(step=step, loss=main_loss, total_loss=total, lr=lr, grad_norm=grad_norm,
                      tokens_per_s=tokens_per_step / dt, **logged)
        if quant_step:
            quant.monitor(False)
            record.update(_quant_record(quant, cfg.out, step, rank))
        for i, c in counts.items():
            if c.sum() > 0:                      # an MTP layer with no MTP loss this run routes nothing
                record.update({f"moe{i}_{k}": v for k, v in load_stats(c).items()})
        if eval_w is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            record.update(evaluate(model, eval_w, cfg, mtp_depths))
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{main_loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", lr=f"{lr:.1e}")
            if "eval_loss" in record:
                log(f"step {step}: held-out loss {record['eval_loss']:.4f}, next-token accuracy "
                    f"{record['eval_accuracy']:.3f}")
        else:
            eta = (time.perf_counter() - t_start) / (step - start_step) * (cfg.max_steps - step)
            log(f"step {step}/{cfg.max_steps} loss {main_loss:.4f} lr {lr:.2e} {record['tokens_per_s']:.0f} tok/s "
                f"eta {eta:.0f}s" + (f" eval {record['eval_loss']:.4f}" if "eval_loss" in record else ""))
        if rank == 0 and (step % cfg.save_every == 0 or step == cfg.max_steps):
            save_checkpoint(cfg.out, step, model, optimizer, {"sampler": sampler.state_dict(), "config": asdict(cfg)},
                            cfg.keep_last)
    metrics.close()
    if bar is not None:
        bar.close()
    final = os.path.join(cfg.out, "final")
    if rank == 0:
        model.save_pretrained(final)
        from .plot import plot_run
        log(f"plots: {plot_run(cfg.out)}")
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    return final


def explain_precision(cfg: TrainConfig, model_config=None) -> str:
    """Which format each GEMM layer trains in under cfg (built on the meta device: no memory, no time)."""
    with torch.device("meta"):
        model = NemotronForCausalLM(model_config or from_preset(cfg.preset))
    if cfg.precision != "nvfp4":
        return f"--precision {cfg.precision}: every layer trains in {cfg.precision} (use --precision nvfp4)."
    quant = apply_recipe(model, nvfp4_recipe(cfg))
    return f"{cfg.preset}, --precision nvfp4 (high = fp32 on CPU, bf16 autocast on CUDA):\n" + explain(quant.plan)


def nvfp4_recipe(cfg: TrainConfig) -> NVFP4Recipe:
    return NVFP4Recipe(high_precision_last=cfg.nvfp4_high_last, mamba_out_proj=cfg.nvfp4_mamba_out,
                       rht=not cfg.nvfp4_no_rht, stochastic_rounding=not cfg.nvfp4_no_sr,
                       weight_tile_2d=not cfg.nvfp4_no_2d, all_nvfp4=cfg.nvfp4_all, seed=cfg.seed)


def _quant_record(quant, out_dir: str, step: int, rank: int) -> dict:
    """Per-layer quantization statistics to quant_stats.jsonl; their means per format for metrics.jsonl
    (e.g. nvfp4_ftz_act: share of nonzero activations flushed to zero, nvfp4_wgrad_zero: share of exactly-zero
    weight-gradient elements)."""
    per_layer = quant.stats()
    fmt_of = {p.name: p.format for p in quant.plan}
    means: dict = {}
    for name, s in per_layer.items():
        for k, v in s.items():
            means.setdefault(f"{fmt_of[name]}_{k}", []).append(v)
    if rank == 0:
        with open(os.path.join(out_dir, "quant_stats.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "layers": per_layer}) + "\n")
    return {k: sum(v) / len(v) for k, v in means.items()}


def _distributed() -> tuple[int, int]:
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) joins the process group: gloo on CPU, NCCL on GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def _all_reduce_grads_and_stats(model, counts: dict, world: int, total: float, main_loss: float):
    """DDP by hand: one all-reduce of all gradients (flattened), mean over ranks. A rank whose tokens never reached
    some expert contributes zeros for it, so MoE needs no find_unused_parameters."""
    import torch.distributed as dist
    params = list(model.parameters())
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    for c in counts.values():
        dist.all_reduce(c)
    stats = torch.tensor([total, main_loss], dtype=torch.float64, device=flat.device)   # NCCL wants GPU tensors
    dist.all_reduce(stats)
    return float(stats[0]) / world, float(stats[1]) / world


def read_last_metrics(run_dir: str) -> dict:
    """The last metrics.jsonl record of a run that has an evaluation in it."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return next((r for r in reversed(rows) if "eval_loss" in r), rows[-1])


def _truncate_metrics(path: str, last_step: int) -> None:
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= last_step]
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def main(argv=None):
    p = argparse.ArgumentParser(prog="nemotron3 train", description=__doc__.split("\n")[0])
    doc = _field_docs()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action="store_true", help=doc.get(f.name, ""))
        else:
            p.add_argument(flag, type={"int": int, "float": float}.get(f.type, str), default=f.default,
                           help=f"{doc.get(f.name, '')} (default {f.default})")
    p.add_argument("--explain", action="store_true", help="print each layer's training format and exit")
    args = vars(p.parse_args(argv))
    show_plan = args.pop("explain")
    cfg = TrainConfig(**args)
    if show_plan:
        print(explain_precision(cfg))
        return 0
    final = train(cfg)
    print(f"final model: {final}")


def _field_docs() -> dict:
    """The docstrings under TrainConfig's fields, for --help (what jsonargparse does for litgpt)."""
    import ast
    import inspect
    tree = ast.parse(inspect.getsource(TrainConfig))
    body, docs = tree.body[0].body, {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = b.value.value
    return docs


if __name__ == "__main__":
    sys.exit(main())
