"""The training machinery shared by pretraining, SFT and RL: model + AdamW + WSD schedule + gradient accumulation +
clipping + MoE balancing + the MTP loss + evaluation + atomic checkpoints with exact resume + torchrun data
parallelism + progress bar + metrics.jsonl + plots. Each training kind brings only its data and its loss:

    model, tokenizer = build_model(cfg)                  # cfg.model: a saved model dir (its tokenizer too)
    trainer = Trainer(cfg, model, LMLoss.from_config(cfg, model))   # next-token + MTP + aux loss (lm_loss.py)
    trainer.train(batches, lambda: held_out, save_extra=tokenizer_files)   # batches: iterator of dict micro-batches

The shape is torchtitan's: `forward_backward_step` (one micro-batch), `train_step` (one optimizer step over
grad_accum micro-batches), `train` (the loop). A micro-batch is a dict of CPU tensors, all (b, L):
    input_ids; labels (the inputs themselves, -100 = no loss; shifted inside the model); optional position_ids
    (packed sequences restarting at 0); optional loss_weights (per label); optional attention_mask (padding).
Loss normalisation spans the whole step: before any forward pass the trainer sums `loss.count(batch)` over the
step's micro-batches and all ranks (torchtitan's global_valid_tokens), and every micro-batch divides its summed
loss by those totals; so accumulation and data parallelism give the gradient of the one big batch, whatever the
number of valid targets in each micro-batch. Gradients are then summed over ranks (not averaged).
The data iterator may offer state_dict() / load_state_dict() (as ResumableSampler does): checkpoints keep it.
Under torchrun, parallelize.py shards the model from outside (FSDP2 per block, expert parallelism with --ep,
activation checkpointing with --act-ckpt, tensor parallelism with --tp, context parallelism with --cp) and checkpoints become DCP shards
(checkpointing.py, --async-save to write them in the background); --model DIR then builds the model on the meta
device and each rank reads only its shards of the weights (checkpoint.load_into_shards); --no-fsdp keeps whole
weights on every rank and sums their gradients with one flattened all-reduce.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields

import torch
from torch.distributed.fsdp import FSDPModule

from ..checkpoint import load_into_shards, read_draft_vocab, save_pretrained
from ..config import from_preset
from ..model import NemotronForCausalLM
from ..model.moe import MoE
from ..quant import NVFP4Recipe, apply_recipe
from .balance import load_stats, update_expert_bias
from .checkpointing import list_checkpoints, load_checkpoint, save_checkpoint, save_sharded_checkpoint
from .parallelize import clip_grad_norm_, full_state_dict, parallelize
from .schedule import WSDSchedule


@dataclass
class TrainerConfig:
    preset: str = "tiny"
    """Architecture preset (nemotron3 info --list), used when --model is not given."""
    model: str = ""
    """Start from this model directory (config.json + weights, and its tokenizer.json if any) instead of a preset."""
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
    batch_size: int = 8
    """Sequences (rows) per micro-batch."""
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
    loss_normalization: str = "token"
    """token: mean over all valid targets of the step (global); sequence: mean over sequences of each sequence's
    mean (Super SFT stage 2)."""
    bias_rate: float = 1e-3
    """Aux-loss-free expert-bias update rate (0 = off)."""
    aux_coeff: float = 1e-4
    """Sequence-level load-balancing loss coefficient (0 = off)."""
    eval_every: int = 50
    eval_batches: int = 4
    on_nan: str = "stop"
    """stop (keep the last good checkpoint) or skip (drop the step) when the loss or gradient is not finite."""
    optimizer: str = "adamw"
    """adamw (0.9, 0.95) or sgd (plain, the same weight decay; what the multi-process equality tests use)."""
    ep: int = 1
    """Expert parallelism under torchrun: each group of ep ranks shares one copy of the experts (E/ep per rank);
    the data-parallel degree is nproc / ep and --batch-size stays per rank."""
    tp: int = 1
    """Tensor parallelism under torchrun (meant for GPUs): attention and dense MLPs split column / row-wise over tp
    ranks, which read the same batch; the data-parallel degree is nproc / tp. Not with --ep (yet)."""
    cp: int = 1
    """Context parallelism under torchrun, for long sequences: the cp ranks of a group read the same rows and each
    computes L/cp consecutive tokens of them (attention and Mamba reach the whole sequence by all-to-all; NCCL or
    gloo); the data-parallel degree is nproc / (ep * cp). Needs heads and the sequence length divisible by cp."""
    no_fsdp: bool = False
    """Under torchrun, keep every weight on every rank and all-reduce the gradients (no FSDP2 sharding)."""
    act_ckpt: bool = False
    """Activation checkpointing per block: keep only block inputs, recompute the rest in backward."""
    cpu_offload: bool = False
    """FSDP2: keep the sharded parameters, gradients and optimizer state in CPU memory."""
    compile_blocks: bool = False
    """torch.compile each block (and the MTP unit) on its own, as torchtitan does.
    The first step pays the compilation (~2 min for tiny on 2 CPU cores); measured on tiny, 4 x 128 tokens, one
    thread: steps then 1.5x faster than eager, same losses."""
    async_save: bool = False
    """Sharded runs: write checkpoints in the background (dcp.async_save) while training continues; step_N appears
    (atomically) once every rank has finished writing it, at the next save or the end of the run."""
    constant_lr: bool = False
    """Constant learning rate --lr from the first step (no warmup, no decay): the long-context stage's schedule."""

    def validate(self) -> None:
        choices = {"precision": ("fp32", "bf16", "nvfp4"), "on_nan": ("stop", "skip"), "optimizer": ("adamw", "sgd"),
                   "device": ("auto", "cpu", "cuda"), "loss_normalization": ("token", "sequence")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: use {', '.join(allowed[:-1])} or "
                                 f"{allowed[-1]}.")
        for name in ("max_steps", "save_every", "keep_last", "batch_size", "grad_accum", "eval_every", "ep", "tp", "cp"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} must be >= 1.")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible; use --device cpu.")
        if self.model and not os.path.isfile(os.path.join(self.model, "config.json")):
            raise ValueError(f"--model {self.model}: no config.json there; give a directory written by "
                             f"save_pretrained (e.g. a run's final/) or a Hugging Face NemotronH checkpoint.")


def build_model(cfg: TrainerConfig, model_config=None, device="cpu"):
    """(model, tokenizer): from --model DIR with its tokenizer (bytes if it has no tokenizer.json), else the preset
    (or model_config) with fresh weights and the byte tokenizer."""
    from ..tokenizer import ByteTokenizer, load_tokenizer
    if cfg.model and shards_weights(cfg):       # built empty; each rank reads its shards after parallelize
        from ..config import NemotronConfig
        with torch.device("meta"):
            model = NemotronForCausalLM(NemotronConfig.from_json_file(cfg.model))
        model.draft_vocab = read_draft_vocab(cfg.model, model.config.vocab_size)     # as from_pretrained reads it
        tokenizer = load_tokenizer(cfg.model, model.config.vocab_size)
    elif cfg.model:
        model = NemotronForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
        tokenizer = load_tokenizer(cfg.model, model.config.vocab_size)
    else:
        torch.manual_seed(cfg.seed)
        model = NemotronForCausalLM(model_config or from_preset(cfg.preset))
        tokenizer = ByteTokenizer()
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"the model has vocab_size {model.config.vocab_size} < the tokenizer's "
                         f"{tokenizer.vocab_size}; use a model whose embedding covers its tokenizer.")
    return (model if model.lm_head.weight.is_meta else model.to(device)).train(), tokenizer


def shards_weights(cfg: TrainerConfig) -> bool:
    """Whether this run shards the weights across ranks (torchrun with more than one process, FSDP2 on)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not cfg.no_fsdp


def resolve_device(cfg: TrainerConfig) -> torch.device:
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")


def nvfp4_recipe(cfg: TrainerConfig) -> NVFP4Recipe:
    return NVFP4Recipe(high_precision_last=cfg.nvfp4_high_last, mamba_out_proj=cfg.nvfp4_mamba_out,
                       rht=not cfg.nvfp4_no_rht, stochastic_rounding=not cfg.nvfp4_no_sr,
                       weight_tile_2d=not cfg.nvfp4_no_2d, all_nvfp4=cfg.nvfp4_all, seed=cfg.seed)


def make_optimizer(model, cfg: TrainerConfig):
    """AdamW (0.9, 0.95) or SGD; weight decay on matrices only (norms, biases, A_log, D, dt_bias are not decayed)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


class Trainer:
    """One training run of `model` under `cfg` with `loss` (an object with count(batch) and
    loss(model, batch, totals) -> (loss, metrics, output), like LMLoss). log: a callable taking one line per step,
    or None for a progress bar (tqdm)."""

    def __init__(self, cfg: TrainerConfig, model, loss, log=None, config_record: dict | None = None):
        cfg.validate()
        self.cfg, self.model, self.loss = cfg, model, loss
        self.rank, self.world = distributed()
        meta = next(model.parameters()).is_meta       # built by build_model to be filled shard by shard
        self.device = resolve_device(cfg) if meta else next(model.parameters()).device
        self.quant = apply_recipe(model, nvfp4_recipe(cfg)) if cfg.precision == "nvfp4" else None
        bf16 = cfg.precision == "bf16" or (cfg.precision == "nvfp4" and self.device.type == "cuda")
        self.mesh = None
        if not isinstance(model, FSDPModule):          # a model sharded by an earlier Trainer stays as it is
            self.mesh = parallelize(model, self.world, cfg.ep, not cfg.no_fsdp, cfg.act_ckpt, cfg.cpu_offload,
                                    bf16 and self.device.type == "cuda", self.device, cfg.tp, cfg.cp,
                                    cfg.compile_blocks)
        # statistics and expert loads are summed over the data-parallel ranks (tp ranks see the same batch); the
        # loss totals, which count whole rows, over the ranks that read different rows (cp ranks share them too)
        self.dp_group = self.mesh["dp"].get_group() if self.mesh is not None and cfg.tp > 1 else None
        self.cp_group = self.mesh["cp"].get_group() if self.mesh is not None and cfg.cp > 1 else None
        self.rows_group = self.dp_group
        if self.cp_group is not None:
            self.rows_group = self.mesh["dp", "ep"]._flatten("dp_ep").get_group()
            if not hasattr(loss, "context_parallel"):
                raise ValueError(f"--cp {cfg.cp}: this training kind's loss does not support context parallelism "
                                 f"(train and sft do); drop --cp.")
            loss.context_parallel(self.cp_group)
        self.sharded = isinstance(model, FSDPModule)
        if meta:
            load_into_shards(model, cfg.model, self.device)
        self.optimizer = make_optimizer(model, cfg)
        decay_start = cfg.max_steps - round(cfg.max_steps * cfg.decay_fraction)
        self.schedule = (WSDSchedule(cfg.lr, cfg.max_steps, 0, 0.0) if cfg.constant_lr else
                         WSDSchedule(cfg.lr, cfg.max_steps, min(cfg.warmup_steps, decay_start),   # short runs
                                     cfg.decay_fraction, 0.01, "minus_sqrt"))
        self.moe_layers = [m for m in model.modules() if isinstance(m, MoE)]
        self.autocast = torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=bf16)
        self.log = log if self.rank == 0 else (lambda *_: None)      # rank 0 speaks; None: a progress bar
        self.config_record = config_record if config_record is not None else asdict(cfg)
        self.step = 0
        self.expert_counts: dict[int, torch.Tensor] = {}
        self.pending_save = None          # an --async-save checkpoint not yet complete
        self.end_process_group = True     # train() leaves the process group at the end (False: run another)

    # ---- one micro-batch, one optimizer step ----
    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def step_totals(self, batches: list[dict], across_ranks: bool = True) -> dict[str, torch.Tensor]:
        """The loss normalisers of one optimizer step: loss.count summed over its micro-batches (and all ranks)."""
        totals: dict[str, torch.Tensor] = {}
        for b in batches:
            for k, v in self.loss.count(b).items():
                totals[k] = totals.get(k, 0) + v.to(self.device)
        if self.world > 1 and across_ranks:
            import torch.distributed as dist
            for v in totals.values():
                dist.all_reduce(v, group=self.rows_group)
        return totals

    def forward_backward_step(self, batch: dict, totals: dict) -> dict[str, torch.Tensor]:
        """Forward, loss, backward of one micro-batch (gradients accumulate in .grad); its metrics."""
        with self.autocast:
            loss, metrics, out = self.loss(self.model, batch, totals)
        loss.backward()
        return metrics

    def accumulate_gradients(self, batches: list[dict]) -> dict[str, float]:
        """Gradients of the step's whole (global) batch in .grad, summed over ranks; its metrics."""
        batches = [self._to_device(b) for b in batches]
        totals = self.step_totals(batches)
        for m in self.moe_layers:                  # each MoE layer counts its routed tokens while training
            m.tokens_per_expert.zero_()
        summed: dict[str, torch.Tensor] = {}
        for b in batches:
            for k, v in self.forward_backward_step(b, totals).items():
                summed[k] = summed.get(k, 0) + v.detach().double()
        self.expert_counts = {m.layer_idx: m.tokens_per_expert.clone() for m in self.moe_layers}
        names = sorted(summed)
        stats = torch.stack([summed[k] for k in names] +
                            [sum(b["input_ids"].numel() for b in batches) / self.cfg.cp *      # the rank's tokens
                             torch.ones((), dtype=torch.float64, device=self.device)])
        if self.world > 1:              # FSDP2 has summed the gradients already; replicated weights sum them here
            _all_reduce_sum([] if self.sharded else list(self.model.parameters()), self.expert_counts, stats,
                            self.dp_group)
        values = stats.tolist()
        return dict(zip(names, values[:-1]), tokens=values[-1])

    def train_step(self, batches: list[dict]) -> dict | None:
        """One optimizer step over grad_accum micro-batches; its metrics record, or None if skipped (on_nan)."""
        cfg, step = self.cfg, self.step
        lr = self.schedule(step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        quant_step = self.quant is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps)
        if self.quant is not None:
            self.quant.reseed(step, self.rank)         # stochastic rounding repeats exactly after a resume
            self.quant.monitor(quant_step)
        metrics = self.accumulate_gradients(batches)
        grad_norm = clip_grad_norm_(list(self.model.parameters()), cfg.grad_clip)
        if not (math.isfinite(metrics["total_loss"]) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            msg = f"step {step}: loss {metrics['total_loss']} / gradient norm {grad_norm} is not finite"
            if cfg.on_nan == "stop":
                last = list_checkpoints(cfg.out)
                raise FloatingPointError(f"{msg}; stopped without writing these weights. Last good checkpoint: "
                                         f"{last[-1][1] if last else 'none'}. Lower --lr or use --on-nan skip.")
            if self.log is not None:
                self.log(msg + "; step skipped (--on-nan skip)")
            self.step += 1
            return None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if cfg.bias_rate:
            for m in self.moe_layers:
                update_expert_bias(m.gate.e_score_correction_bias, self.expert_counts[m.layer_idx], cfg.bias_rate)
        self.step += 1
        tokens = metrics.pop("tokens")
        record = dict(step=self.step, loss=metrics.pop("loss"), total_loss=metrics.pop("total_loss"), lr=lr,
                      grad_norm=grad_norm, tokens_per_s=tokens / (time.perf_counter() - t0), **metrics)
        if quant_step:
            self.quant.monitor(False)
            record.update(_quant_record(self.quant, cfg.out, self.step, self.rank))
        for i, c in self.expert_counts.items():
            if c.sum() > 0:                      # an MTP layer with no MTP loss this run routes nothing
                record.update({f"moe{i}_{k}": v for k, v in load_stats(c).items()})
        return record

    @torch.no_grad()
    def evaluate(self, batches) -> dict[str, float]:
        """Held-out metrics over `batches` (one mean over all of them), as eval_<name>. Every rank evaluates the
        same batches, so nothing is reduced across ranks but the cp ranks' shares of each row."""
        batches = [self._to_device(b) for b in batches]
        if not batches:
            return {}
        self.model.eval()
        totals = self.step_totals(batches, across_ranks=False)
        summed: dict[str, float] = {}
        for b in batches:
            with self.autocast:
                _, metrics, _ = self.loss(self.model, b, totals)
            for k, v in metrics.items():
                summed[k] = summed.get(k, 0.0) + float(v)
        self.model.train()
        if self.cp_group is not None:
            import torch.distributed as dist
            shares = torch.tensor([summed[k] for k in sorted(summed)], dtype=torch.float64, device=self.device)
            dist.all_reduce(shares, group=self.cp_group)
            summed = dict(zip(sorted(summed), shares.tolist()))
        return {f"eval_{k}": v for k, v in summed.items() if k != "total_loss"}

    # ---- the loop ----
    def train(self, data, eval_data=None, save_extra=()) -> str:
        """Run (or resume) to cfg.max_steps; returns the final model directory. data: an iterator of micro-batch
        dicts (with state_dict / load_state_dict to resume its position); eval_data: a callable returning an
        iterable of held-out micro-batches, or None. save_extra: files copied into every saved model directory
        (a tokenizer)."""
        cfg, rank = self.cfg, self.rank
        os.makedirs(cfg.out, exist_ok=True)
        if cfg.resume and not list_checkpoints(cfg.out):       # before the progress bar draws anything
            raise ValueError(f"--resume: no checkpoint in {cfg.out}/checkpoints; start without --resume.")
        bar = None
        if rank == 0 and self.log is None:
            from tqdm import tqdm
            bar = tqdm(total=cfg.max_steps, unit="step", dynamic_ncols=True, mininterval=1.0)
            self.log = bar.write
        if cfg.resume:
            path = list_checkpoints(cfg.out)[-1][1]
            state = load_checkpoint(path, self.model, self.optimizer)
            if hasattr(data, "load_state_dict"):
                data.load_state_dict(state["data"] if "data" in state else state["sampler"])   # older runs: "sampler"
            self.step = state["step"]
            if rank == 0:                      # drop steps logged after it (one writer: rank 0)
                _truncate_metrics(os.path.join(cfg.out, "metrics.jsonl"), self.step)
            self.log(f"resumed from {path} at step {self.step}")
            if bar is not None:
                bar.update(self.step)
        start_step, t_start = self.step, time.perf_counter()
        metrics = open(os.path.join(cfg.out, "metrics.jsonl"), "a") if rank == 0 else open(os.devnull, "w")
        try:
            while self.step < cfg.max_steps:
                record = self.train_step([next(data) for _ in range(cfg.grad_accum)])
                if record is None:
                    continue
                step = self.step
                if eval_data is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                    record.update(self.evaluate(eval_data()))
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                self._report(record, bar, t_start, start_step)
                if step % cfg.save_every == 0 or step == cfg.max_steps:
                    extra = {"data": data.state_dict() if hasattr(data, "state_dict") else None,
                             "config": self.config_record}
                    if self.sharded:        # every rank writes its shards (DCP)
                        self._finish_save()
                        saved = save_sharded_checkpoint(cfg.out, step, self.model, self.optimizer, extra,
                                                        cfg.keep_last, save_extra, cfg.async_save)
                        self.pending_save = saved if cfg.async_save else None
                    elif rank == 0:
                        saved = save_checkpoint(cfg.out, step, self.model, self.optimizer, extra, cfg.keep_last)
                        _copy_into(save_extra, saved)
        finally:
            metrics.close()
            if bar is not None:
                bar.close()
        self._finish_save()
        final = os.path.join(cfg.out, "final")
        state = full_state_dict(self.model)          # gathered onto rank 0 when sharded
        if rank == 0:
            save_pretrained(self.model, final, state_dict=state)
            _copy_into(save_extra, final)
            from .plot import plot_run
            self.log(f"plots: {plot_run(cfg.out)}")
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()
            if self.end_process_group:
                dist.destroy_process_group()
        return final

    def _finish_save(self) -> None:
        """Complete a checkpoint still being written in the background (--async-save)."""
        if self.pending_save is not None:
            self.pending_save.finish()
            self.pending_save = None

    def _report(self, record: dict, bar, t_start: float, start_step: int) -> None:
        loss, step, cfg = record["loss"], record["step"], self.cfg
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", lr=f"{record['lr']:.1e}")
            if "eval_loss" in record:
                self.log(f"step {step}: held-out loss {record['eval_loss']:.4f}, next-token accuracy "
                         f"{record['eval_accuracy']:.3f}")
        else:
            eta = (time.perf_counter() - t_start) / (step - start_step) * (cfg.max_steps - step)
            self.log(f"step {step}/{cfg.max_steps} loss {loss:.4f} lr {record['lr']:.2e} "
                     f"{record['tokens_per_s']:.0f} tok/s eta {eta:.0f}s" +
                     (f" eval {record['eval_loss']:.4f}" if "eval_loss" in record else ""))


def _copy_into(paths, directory: str) -> None:
    for p in paths:
        shutil.copy(p, os.path.join(directory, os.path.basename(p)))


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


def distributed() -> tuple[int, int]:
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


def data_parallel_rank(cfg: TrainerConfig) -> tuple[int, int]:
    """(this rank's data shard, number of data shards): every rank its own batch, except that the tp ranks of a
    tensor-parallel group and the cp ranks of a context-parallel group (consecutive ranks) read the same one."""
    rank, world = distributed()
    return rank // (cfg.tp * cfg.cp), world // (cfg.tp * cfg.cp)


def _all_reduce_sum(params: list, counts: dict, stats: torch.Tensor, group=None) -> None:
    """DDP by hand (--no-fsdp): one all-reduce of all gradients of `params` (flattened), summed over ranks (each
    rank's loss is already divided by the global totals). A rank whose tokens never reached some expert contributes
    zeros for it, so MoE needs no find_unused_parameters. Expert loads and the logged statistics are summed too."""
    import torch.distributed as dist
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if params:
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
    for c in counts.values():
        dist.all_reduce(c, group=group)
    dist.all_reduce(stats, group=group)


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


def config_flags(parser, cls) -> None:
    """One --flag per dataclass field (`_` written `-`), its docstring as help (what jsonargparse does for litgpt)."""
    doc = {k: v.replace("%", "%%") for k, v in field_docs(cls).items()}     # argparse %-formats help strings
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", help=doc.get(f.name, ""))
        else:
            parser.add_argument(flag, type={"int": int, "float": float}.get(f.type, str), default=f.default,
                                help=f"{doc.get(f.name, '')} (default {f.default})")


def field_docs(cls) -> dict:
    """The docstrings under a dataclass's fields, its bases' included."""
    import ast
    import inspect
    docs = {}
    for klass in reversed([k for k in cls.__mro__ if k is not object]):
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                docs[a.target.id] = b.value.value
    return docs
