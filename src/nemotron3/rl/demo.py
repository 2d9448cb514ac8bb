"""The demo's RL phase: a short GRPO run of the SFT'd demo model on the math environment in the SFT set's own form
(math_short, "3+8-4=?"), with held-out reward before and after. `make demo` calls it after SFT:

    from nemotron3.rl import demo_phase
    r = demo_phase("runs/sft/final", "runs/rl", steps=30, seed=0)   # {"before": {"math_short": 0.68}, "after": ...}

Settings sized for ~1.5 minutes on 2 CPU cores with the tiny byte-level model: G = 8 samples of 4 prompts per step,
reasoning on (the SFT set teaches "3+8=11, 11-4=7." before the answer), 48 tokens per answer, lr 1e-4 (measured
from a 900-step SFT model at held-out reward 0.68: 1e-3 collapsed it to 0.27 in 20 steps, 3e-4 drifted to 0.64,
1e-4 gained 0.026 in 30 steps, mean of 3 seeds, bench/rl_curve.py; the paper's 3e-6 is for billions of
parameters), held-out reward over 32 test-split problems x 4 samples at temperature 1 (seeded: before and after
score the same draws). Truncated answers stay in the loss (keep_overlong): at 48 tokens a truncated answer is a
failure, not a long right one, and with overlong filtering the failures that stop get pushed down while those that
ramble do not (measured: the truncated share went from 0 to 0.6 in 20 steps, reward fell).
"""

from __future__ import annotations

from .train import GRPOConfig, train_rl

DEMO_SETTINGS = dict(env="math_short", group_size=8, prompts_per_step=4, max_tokens=48, thinking=True, lr=1e-4,
                     keep_overlong=True, warmup_steps=0, eval_tasks=32, eval_samples=4, task_pool=128, device="cpu")


def demo_phase(model_dir: str, out_dir: str, steps: int = 30, seed: int = 0, log=None, **overrides) -> dict:
    """Held-out reward per environment before / after `steps` GRPO steps from model_dir; the RL'd model is written
    to out_dir/final (use a fresh out_dir: the trainer appends to an existing metrics.jsonl). Returns
    {"before": {env: reward}, "after": {env: reward}, "final": dir}."""
    cfg = GRPOConfig(**{**DEMO_SETTINGS, "model": model_dir, "out": out_dir, "max_steps": steps, "seed": seed,
                        "save_every": steps, **overrides})
    result = train_rl(cfg, log=log or (lambda *_: None))
    return {"before": result["before"], "after": result["after"], "final": result["final"]}
