"""MTP healing (Nemotron 3 Super, the stage after RLHF): RL moves the backbone, and MTP heads trained on the old
policy's hidden states draft tokens the new policy no longer picks, so speculative acceptance decays. Healing
freezes the backbone (embeddings and LM head included) and retrains the MTP heads alone on the final policy's own
generations, with the MTP loss of pretraining / SFT (LMLoss: depth k at position t predicts token t + k + 1) on the
generated tokens only, through the shared Trainer.

    result = heal_mtp(model, tokenizer, envs, cfg, "runs/rl/heal")      # {"before": 0.41, "after": 0.63, ...}
    nemotron3 rl ... --heal-mtp-steps 100                               # the same, after the RL run

Acceptance is measured before and after on held-out prompts: the share of MTP drafts the engine's rejection
sampling accepts (mean over draft positions 1..D), at the rollout temperature with seeded sampling.
Left out: healing with data other than the policy's rollouts (Super heals on its RL prompts, as here).
"""

from __future__ import annotations

from itertools import islice

import torch

from ..infer import Engine, SamplingParams
from ..train.lm_loss import LMLoss
from ..train.trainer import Trainer, TrainerConfig
from .rollout import batch_tensors, rollout


@torch.no_grad()
def draft_acceptance(model, tokenizer, envs: dict, cfg, depths: int, tasks_per_env: int = 8) -> float:
    """Mean share of accepted MTP drafts (positions 1..depths) generating for held-out tasks of every env."""
    engine = Engine(model, tokenizer, depths, max_batch=max(64, cfg.eval_samples))
    sampling = SamplingParams(temperature=cfg.temperature, top_p=1.0, seed=cfg.seed + 777)
    for env in envs.values():
        tasks = list(islice(env.tasks("test", cfg.seed + 2), tasks_per_env))
        rollout(engine, tokenizer, env, tasks, cfg.eval_samples, sampling=sampling, **cfg.episode())
    acc = engine.acceptance()
    return sum(acc) / len(acc)


@torch.no_grad()
def policy_generations(model, tokenizer, envs: dict, cfg, prompts_per_env: int, batch_rows: int) -> list[dict]:
    """Micro-batches (input_ids, labels = the generated tokens, -100 elsewhere) of the policy's own rollouts on
    training tasks (a seed stream apart from the RL run's)."""
    engine = Engine(model, tokenizer, 0, max_batch=max(64, cfg.group_size))
    sampling = SamplingParams(temperature=cfg.temperature, top_p=1.0, seed=cfg.seed + 999)
    groups = []
    for env in envs.values():
        tasks = list(islice(env.tasks("train", cfg.seed + 3), prompts_per_env))
        groups += rollout(engine, tokenizer, env, tasks, cfg.group_size, sampling=sampling, **cfg.episode())
    batches = []
    for i in range(0, len(groups), max(1, batch_rows // cfg.group_size)):
        b = batch_tensors(groups[i:i + max(1, batch_rows // cfg.group_size)])
        batches.append({"input_ids": b["input_ids"],
                        "labels": torch.where(b["loss_mask"].bool(), b["input_ids"], -100)})
    return batches


class _Cycle:
    def __init__(self, items):
        self.items, self.i = items, 0

    def __iter__(self):
        return self

    def __next__(self):
        item = self.items[self.i % len(self.items)]
        self.i += 1
        return item


def heal_mtp(model, tokenizer, envs: dict, cfg, out_dir: str, log=print, lr: float = 1e-3,
             prompts_per_env: int = 32) -> dict:
    """Retrain the MTP heads of `model` (in place) for cfg.heal_mtp_steps steps on its own generations; returns
    {"before": acceptance, "after": acceptance, "final": the healed model's directory}. cfg: a GRPOConfig (its
    rollout settings, mtp_depths, seed, device)."""
    if model.mtp is None:
        raise ValueError("MTP healing needs MTP heads; this model has none (num_nextn_predict_layers=0).")
    depths = cfg.mtp_depths or 1
    model.eval()
    before = draft_acceptance(model, tokenizer, envs, cfg, depths)
    batches = policy_generations(model, tokenizer, envs, cfg, prompts_per_env, batch_rows=16)
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("mtp."))                  # backbone, embeddings, LM head frozen
    heal_cfg = TrainerConfig(**{**{f: getattr(cfg, f) for f in TrainerConfig.__dataclass_fields__},
                                "out": out_dir, "max_steps": cfg.heal_mtp_steps, "save_every": cfg.heal_mtp_steps,
                                "resume": False, "lr": lr, "warmup_steps": 0, "decay_fraction": 0.2,
                                "weight_decay": 0.0, "mtp_depths": depths, "mtp_lambda": 1.0, "aux_coeff": 0.0,
                                "bias_rate": 0.0, "grad_accum": 1, "model": ""})
    model.train()
    try:
        final = Trainer(heal_cfg, model, LMLoss(depths, 1.0), log).train(_Cycle(batches))
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(trainable[n])
    model.eval()
    after = draft_acceptance(model, tokenizer, envs, cfg, depths)
    return {"before": before, "after": after, "final": final}

