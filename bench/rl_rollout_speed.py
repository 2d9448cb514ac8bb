"""Sync vs async RL rollouts, same run: generated tokens/s and reward against wall-clock for the same GRPO steps
from the same initial weights (Nemotron 3: Nano trains synchronously, Super asynchronously one step off-policy).

    python bench/rl_rollout_speed.py                       # ~1.5 min on 2 CPU threads
    python bench/rl_rollout_speed.py --steps 40 --device cuda

The policy is the tiny preset (random init, byte tokens) and the environment a learnable toy: reward = share of
lowercase letters in the answer, so GRPO moves it within a few dozen steps and a reward-vs-time curve means
something. Each step: B prompts x G samples (temperature 1, top_p 1, MTP speculation K=2), then one GRPO step
(masked importance sampling against the generation log-probs, Adam). Sync: generate, then train, in one process.
Async: a rollout worker process generates the next batch while the trainer trains on this one
(max_trajectory_age_steps=1, weights pushed after every step, in flight). The async run uses two processes (trainer
+ worker, one thread each) where sync uses one: the overlap is the point. Writes bench/results/rl_rollout_speed.json
and .png. The GRPO step here is a minimal one for the measurement; the real trainer lives in train/.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import new_figure, print_table, save, save_figure  # noqa: E402

import torch  # noqa: E402

from nemotron3 import NemotronForCausalLM, from_preset  # noqa: E402
from nemotron3.rl import Environment, Task, group_advantages, grpo_loss  # noqa: E402
from nemotron3.rl.rollout import RolloutConfig, SyncRollouts, batch_tensors, policy_weights  # noqa: E402
from nemotron3.rl.workers import AsyncRollouts  # noqa: E402
from nemotron3.tokenizer import ByteTokenizer  # noqa: E402


class Lowercase(Environment):
    """Reward: the share of lowercase ASCII letters in the answer (0 for an empty one)."""
    name = "lowercase"

    def tasks(self, split, seed):
        i = seed
        while True:
            yield Task([{"role": "user", "content": f"Write something ({i})."}], {})
            i += 1

    def score(self, task, completion):
        return sum("a" <= c <= "z" for c in completion) / max(len(completion), 1)


def grpo_step(model, opt, groups) -> float:
    """One GRPO update on a batch of groups; returns the batch's mean reward."""
    b = batch_tensors(groups)
    adv = group_advantages(b["rewards"]).flatten()                             # (B,)
    ids, mask = b["input_ids"].to(model.lm_head.weight.device), b["attention_mask"]
    logits = model(ids, attention_mask=mask.to(ids.device)).logits[:, :-1].float()   # (B, L-1, V)
    logp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]         # (B, L-1): token t+1
    dev = logp.device
    loss, _ = grpo_loss(logp, logp.detach(), b["gen_logprobs"][:, 1:].to(dev), adv.to(dev),
                        b["loss_mask"][:, 1:].to(dev), truncated=b["truncated"].to(dev))
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return b["rewards"].mean().item()


def run(mode: str, args) -> dict:
    torch.manual_seed(0)
    model = NemotronForCausalLM(from_preset("tiny")).to(args.device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    config = RolloutConfig(group_size=args.group_size, batch_groups=args.batch_groups, max_tokens=args.max_tokens,
                           num_speculative_tokens=2, max_batch=args.group_size * args.batch_groups, seed=0,
                           device=args.device, num_workers=args.num_workers)
    tasks = (("lowercase", t) for t in Lowercase().tasks("train", 0))
    tok = ByteTokenizer()
    if mode == "sync":
        rollouts = SyncRollouts(model, tok, {"lowercase": Lowercase()}, config, tasks)
    else:
        rollouts = AsyncRollouts(model.config, tok, {"lowercase": Lowercase()}, config, tasks)
        rollouts.update_weights(policy_weights(model), version=0)
    curve, tokens, wait, t0 = [], 0, 0.0, time.perf_counter()
    for step in range(args.steps + 1):            # step 0 is warm-up (the worker's start): the clock starts after it
        t_ask = time.perf_counter()
        groups = rollouts.get_batch(version=step)
        if step == 1:
            curve, tokens, wait, t0 = [], 0, 0.0, t_ask
        wait += time.perf_counter() - t_ask           # the trainer idles here: waiting for rollouts
        tokens += sum(t.num_generated for g in groups for t in g)
        model.train()
        reward = grpo_step(model, opt, groups)
        model.eval()
        rollouts.update_weights([] if mode == "sync" else policy_weights(model), version=step + 1)
        curve.append((time.perf_counter() - t0, reward))
    seconds = time.perf_counter() - t0
    stats = dict(rollouts.stats)
    rollouts.close()
    return dict(mode=mode, steps=len(curve), seconds=seconds, trainer_wait_s=wait, tokens=tokens,
                tokens_per_s=tokens / seconds,
                reward_first5=sum(r for _, r in curve[:5]) / 5, reward_last5=sum(r for _, r in curve[-5:]) / 5,
                stale_dropped=stats.get("stale_dropped", 0), max_age_seen=stats.get("max_age_seen", 0),
                mixed_version=stats.get("mixed_version", 0), curve=curve)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--batch-groups", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-workers", type=int, default=1, help="async rollout worker processes")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = [run(mode, args) for mode in ("sync", "async")]
    print_table(rows, ["mode", "steps", "seconds", "trainer_wait_s", "tokens", "tokens_per_s", "reward_first5",
                       "reward_last5", "stale_dropped", "max_age_seen", "mixed_version"])
    print(f"async / sync tokens/s: {rows[1]['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x")
    fig, ax = new_figure()
    for r in rows:
        ax.plot([t for t, _ in r["curve"]], [x for _, x in r["curve"]], label=f"{r['mode']} "
                f"({r['tokens_per_s']:.0f} tok/s)")
    ax.set_xlabel("wall-clock (s)")
    ax.set_ylabel("mean reward of the step's batch")
    ax.set_title("GRPO on the tiny preset: sync vs async rollouts")
    ax.legend()
    name = "rl_rollout_speed" if args.device == "cpu" else f"rl_rollout_speed_{args.device}"
    print(save(name, dict(args=vars(args), rows=rows)), save_figure(fig, name))


if __name__ == "__main__":
    main()
