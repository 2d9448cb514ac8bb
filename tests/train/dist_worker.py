"""What tests/train/test_distributed.py launches under torchrun: several pretraining runs, one after the other, in
one launch (a torchrun start costs seconds on two cores). argv[1]: a JSON list of TrainConfig field dicts. Each run
is pretrain.train's body on the shared Trainer, keeping the process group for the next run. After each run, each
MoE layer's expert-parallel traffic (rows sent off the rank) goes to OUT/traffic_rank{R}.json."""

import json
import os
import sys

import torch.distributed as dist

from nemotron3.train.data import ResumableSampler
from nemotron3.train.lm_loss import LMLoss
from nemotron3.train.pretrain import TrainConfig, WindowBatches, build_data
from nemotron3.train.trainer import Trainer, build_model, distributed


def run(cfg: TrainConfig) -> None:
    rank, world = distributed()
    model, tokenizer = build_model(cfg)
    train_w, eval_w = build_data(cfg, tokenizer)
    sampler = ResumableSampler(len(train_w), cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world)
    trainer = Trainer(cfg, model, LMLoss.from_config(cfg, model), log=lambda *_: None)
    trainer.end_process_group = False
    held_out = WindowBatches(eval_w, None, cfg.batch_size).in_order(cfg.eval_batches)
    trainer.train(WindowBatches(train_w, sampler, cfg.batch_size), lambda: held_out)
    rows = {m.layer_idx: getattr(m.experts, "rows_sent", 0) for m in trainer.moe_layers}
    with open(os.path.join(cfg.out, f"traffic_rank{rank}.json"), "w") as f:
        json.dump(rows, f)


if __name__ == "__main__":
    for spec in json.loads(sys.argv[1]):
        run(TrainConfig(**spec))
    dist.barrier()
    dist.destroy_process_group()
