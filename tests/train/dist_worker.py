"""What tests/train/test_distributed.py launches under torchrun: several pretraining runs, one after the other, in
one launch (a torchrun start costs seconds on two cores). argv[1]: a JSON list of TrainConfig field dicts. Each run
is pretrain.train's body on the shared Trainer, keeping the process group for the next run. After each run, each
MoE layer's expert-parallel traffic (rows sent off the rank) goes to OUT/traffic_rank{R}.json, and the local shape
of layer 1's attention q_proj weight (how FSDP2 / tensor parallelism split it) to OUT/shapes_rank{R}.json. A spec with
"memory_steps": N instead runs N optimizer steps only (no evaluation, no checkpoint) and writes the rank's peak
resident memory above what it held before the model was built to OUT/memory_rank{R}.json (run it first: the
peak is the process's). A spec with "load_only": true builds the model from its --model directory and sets up the
Trainer (which shards it and has each rank read its shards), then writes the gathered weights to OUT/loaded.safetensors
and each rank's peak memory above the start to OUT/memory_rank{R}.json."""

import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from nemotron3.train.data import ResumableSampler
from nemotron3.train.lm_loss import LMLoss
from nemotron3.train.pretrain import TrainConfig, WindowBatches, build_data
from nemotron3.train.parallelize import full_state_dict
from nemotron3.train.trainer import Trainer, build_model, data_parallel_rank, distributed


def resident_bytes(field: str = "VmRSS") -> int:
    """This process's resident memory now (VmRSS) or at its peak (VmHWM). Not getrusage's ru_maxrss: Linux carries
    that over exec from the parent that forked us, so a child of a big pytest process would report its size."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def run(cfg: TrainConfig, memory_steps: int = 0, load_only: bool = False) -> None:
    rank, _ = distributed()
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])     # the optimizer's imports (~100 MB) are library code
    before = resident_bytes()
    model, tokenizer = build_model(cfg)
    if load_only:
        trainer = Trainer(cfg, model, LMLoss.from_config(cfg, model), log=lambda *_: None)
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, f"memory_rank{rank}.json"), "w") as f:     # before rank 0 gathers it all
            json.dump({"peak": resident_bytes("VmHWM") - before}, f)
        state = full_state_dict(trainer.model)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(cfg.out, "loaded.safetensors"))
        return
    train_w, eval_w = build_data(cfg, tokenizer)
    dp_rank, dp_size = data_parallel_rank(cfg)
    sampler = ResumableSampler(len(train_w), cfg.batch_size, seed=cfg.seed, rank=dp_rank, world_size=dp_size)
    trainer = Trainer(cfg, model, LMLoss.from_config(cfg, model), log=lambda *_: None)
    trainer.end_process_group = False
    if memory_steps:
        batches = WindowBatches(train_w, sampler, cfg.batch_size)
        for _ in range(memory_steps):
            trainer.train_step([next(batches) for _ in range(cfg.grad_accum)])
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, f"memory_rank{rank}.json"), "w") as f:
            json.dump({"peak": resident_bytes("VmHWM") - before}, f)
        return
    eos = tokenizer.eos_token_id if cfg.no_cross_document else None       # packed rows, as pretrain.train
    held_out = WindowBatches(eval_w, None, cfg.batch_size, eos).in_order(cfg.eval_batches)
    trainer.train(WindowBatches(train_w, sampler, cfg.batch_size, eos), lambda: held_out)
    rows = {m.layer_idx: getattr(m.experts, "rows_sent", 0) for m in trainer.moe_layers}
    with open(os.path.join(cfg.out, f"traffic_rank{rank}.json"), "w") as f:
        json.dump(rows, f)
    q = model.backbone.layers[1].mixer.q_proj.weight          # the first attention layer's query projection
    with open(os.path.join(cfg.out, f"shapes_rank{rank}.json"), "w") as f:
        json.dump({"q_proj_local": list(q.to_local().shape if hasattr(q, "to_local") else q.shape)}, f)


if __name__ == "__main__":
    for spec in json.loads(sys.argv[1]):
        run(TrainConfig(**{k: v for k, v in spec.items() if k not in ("memory_steps", "load_only")}),
            spec.get("memory_steps", 0), spec.get("load_only", False))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
