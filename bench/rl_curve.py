"""Does GRPO improve the SFT'd tiny model? Held-out reward before / after N steps of `nemotron3 rl`, 3 seeds each, for
sync vs async rollouts, masked importance sampling vs none, and RL from the model before SFT ("no SFT first").

    python bench/rl_curve.py --model runs/sft/final --base /work/models/demo/final      # 14 min on 2 busy cores
    python bench/rl_curve.py --model runs/sft/final --steps 10 --seeds 2                # quicker
    python bench/rl_curve.py --model runs/sft/final --envs tools_short --configs "sync, IS mask" --no-extras \
        --steps 20 --name rl_curve_tools                                                # the tool-use environment

Environments (--envs, one after another): math_short ("3+8-4=?", the built-in SFT set's arithmetic form, reward 1
when math-verify accepts the answer; the default) and tools_short (the SFT set's calc / lookup tool conversations,
multi-turn: reward (right call + right final answer) / 2; 128 tokens per turn); the other built-in environments
(tools, code, structured, instructions) need skills the tiny byte-level model does not have, so their held-out
reward is 0 before and after and they are left out. Held-out reward = mean over 32 test-split problems x 4 samples
at temperature 1, seeded by the run seed, so before / after of one seed score the same draws. Every run: G = 8
samples x 4 prompts per step, reasoning on, 48 tokens, lr 1e-4 (the demo's settings, rl/demo.py; tools_short: 128
tokens per turn). Gains are compared with the spread over seeds of the same configuration (all numbers
from this one run of the script); rl_seconds = wall-clock of the RL loop (rollouts + updates, without the held-out
evaluations), mean over seeds. Writes bench/results/<--name>.json and .png (default rl_curve).
Also measured here: router replay's effect on the train/inference mismatch |logp_train - logp_gen| (a bfloat16
engine generating, the float32 trainer recomputing, with and without the engine's routing), and MTP healing after
the first RL run (draft acceptance of the SFT model, of the RL'd model, and after healing its MTP heads).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import new_figure, print_table, save, save_figure  # noqa: E402

import copy  # noqa: E402
from itertools import islice  # noqa: E402

import torch  # noqa: E402

from nemotron3.infer import Engine, SamplingParams  # noqa: E402
from nemotron3.rl.demo import DEMO_SETTINGS  # noqa: E402
from nemotron3.rl.heal import draft_acceptance  # noqa: E402
from nemotron3.rl.rollout import RolloutRunner, batch_tensors  # noqa: E402
from nemotron3.rl.train import GRPOConfig, load_envs, replay_tensor, token_logprobs, train_rl  # noqa: E402
from nemotron3.train.trainer import build_model  # noqa: E402

# per environment, over DEMO_SETTINGS; tools_short: two turns of ~100 tokens (a higher lr did not help: from `make
# demo`'s SFT'd model, at 5e-4 seed 0's held-out reward fell 0.059 -> 0.016; from another SFT'd model at 2e-4,
# 0.191 -> 0.172)
ENV_SETTINGS = {"math_short": {}, "tools_short": {"max_tokens": 128}}
CONFIGS = {                                  # name -> (model key, overrides)
    "sync, IS mask": ("sft", {}),
    "async, IS mask": ("sft", {"async_rollouts": True}),
    "sync, IS none": ("sft", {"is_correction": "none"}),
    "no SFT, sync, IS mask": ("base", {}),
}


@torch.no_grad()
def replay_effect(model_dir: str, prompts: int = 16, seed: int = 0) -> dict:
    """|logp_train - logp_gen| over generated tokens: a bfloat16 engine samples (and records its routing), the
    float32 model recomputes, routing itself or replaying the engine's."""
    cfg = GRPOConfig(**{**DEMO_SETTINGS, "model": model_dir, "seed": seed})
    model, tok = build_model(cfg)
    model.eval()
    env = load_envs(cfg)[cfg.env]
    engine = Engine(copy.deepcopy(model).to(torch.bfloat16), tok, 0, max_batch=64)
    runner = RolloutRunner(engine, tok, sampling=SamplingParams(temperature=1.0, seed=seed), max_tokens=cfg.max_tokens,
                           thinking=cfg.thinking, stop=cfg.stop_strings(), return_routed_experts=True)
    tasks = list(islice(env.tasks("train", seed), prompts))
    groups = runner.run([env] * len(tasks), tasks, cfg.group_size)
    batch = batch_tensors(groups)
    mask = batch["loss_mask"].bool()
    out = {}
    for name, routed in (("router", None), ("replay", replay_tensor(groups, batch["input_ids"].shape, model.config))):
        lp, _ = token_logprobs(model, batch["input_ids"], routed_experts=routed)
        d = (lp - batch["gen_logprobs"])[mask].abs()
        out[f"{name}_mean"], out[f"{name}_max"] = d.mean().item(), d.max().item()
    out["tokens"] = int(mask.sum())
    return out


def one_run(model: str, out: str, steps: int, seed: int, overrides: dict) -> dict:
    cfg = GRPOConfig(**{**DEMO_SETTINGS, "model": model, "out": out, "max_steps": steps, "seed": seed,
                        "save_every": steps, **overrides})
    t0 = time.perf_counter()
    result = train_rl(cfg, log=lambda *_: None)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    env = cfg.env
    return {"seed": seed, "before": result["before"][env], "after": result["after"][env], "heal": result.get("heal"),
            "seconds": time.perf_counter() - t0,
            "train_reward": [r["reward"] for r in rows], "wall_s": [r["wall_s"] for r in rows],
            "logp_diff_mean": statistics.mean(r["logp_diff_mean"] for r in rows),
            "rollout_tokens_per_s": statistics.mean(r["rollout_tokens_per_s"] for r in rows)}


def summarize(name: str, runs: list[dict]) -> dict:
    gains = [r["after"] - r["before"] for r in runs]
    spread = statistics.stdev(gains) if len(gains) > 1 else float("nan")
    return {"config": name, "before": statistics.mean(r["before"] for r in runs),
            "after": statistics.mean(r["after"] for r in runs), "gain": statistics.mean(gains),
            "gain_std": spread, "gain_over_std": statistics.mean(gains) / spread if spread else float("nan"),
            "min_gain": min(gains), "rl_seconds": statistics.mean(r["wall_s"][-1] for r in runs)}


COLUMNS = ["config", "before", "after", "gain", "gain_std", "gain_over_std", "min_gain", "rl_seconds"]


def resummarize(path: str) -> None:
    """Recompute the summary table and the figure from a saved results file (no training)."""
    with open(path) as f:
        payload = json.load(f)
    payload["summary"] = [summarize(name, runs) for name, runs in payload["runs"].items()]
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print_table(payload["summary"], COLUMNS)
    print(plot(payload["runs"], os.path.splitext(os.path.basename(path))[0]))


def plot(results: dict, out_name: str = "rl_curve") -> str:
    fig, ax = new_figure(3, size=(15, 4.2))
    for name, runs in results.items():
        n = min(len(r["train_reward"]) for r in runs)
        mean = [statistics.mean(r["train_reward"][i] for r in runs) for i in range(n)]
        wall = [statistics.mean(r["wall_s"][i] for r in runs) for i in range(n)]
        ax[0].plot(range(1, n + 1), mean, label=name)
        ax[1].plot(wall, mean, label=name)
    ax[0].set(xlabel="step", ylabel="training reward (mean of seeds)", title="reward vs step")
    ax[1].set(xlabel="wall-clock s (mean of seeds)", title="reward vs wall-clock")
    names = list(results)
    for i, name in enumerate(names):
        for r in results[name]:
            ax[2].plot([i - 0.15, i + 0.15], [r["before"], r["after"]], "o-", color=f"C{i}", alpha=0.7)
    ax[2].set_xticks(range(len(names)), [n.replace(", ", "\n") for n in names], fontsize=7)
    ax[2].set(ylabel="held-out reward", title="before -> after, each seed")
    ax[0].legend(fontsize=7)
    return save_figure(fig, out_name)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="", help="the SFT'd model directory")
    p.add_argument("--base", default="", help="the model before SFT (the no-SFT baseline); empty: skipped")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--heal-steps", type=int, default=40, help="MTP healing steps after the first RL run")
    p.add_argument("--envs", default="math_short", help=f"comma-separated, of {sorted(ENV_SETTINGS)}")
    p.add_argument("--configs", default="|".join(CONFIGS), help=f"'|'-separated, of {list(CONFIGS)}")
    p.add_argument("--extras", action=argparse.BooleanOptionalAction, default=True,
                   help="router replay, MTP acceptance and healing (on the first environment)")
    p.add_argument("--name", default="rl_curve", help="results file bench/results/<name>.json / .png")
    p.add_argument("--override", default="{}", help='JSON of GRPOConfig fields over the settings, e.g. '
                                                    '\'{"prompts_per_step": 8}\'')
    p.add_argument("--resummarize", default="", help="only redo the table and figure of this results file")
    args = p.parse_args(argv)
    if args.resummarize:
        return resummarize(args.resummarize)
    if not args.model:
        p.error("--model DIR (the SFT'd model) is required")
    envs = [e.strip() for e in args.envs.split(",") if e.strip()]
    configs = [c.strip() for c in args.configs.split("|") if c.strip()]
    for what, given, known in (("--envs", envs, ENV_SETTINGS), ("--configs", configs, CONFIGS)):
        if not given or any(g not in known for g in given):
            p.error(f"{what} {given}: choose from {list(known)}")
    if args.extras and "sync, IS mask" not in configs:
        p.error("--extras heals MTP after the first 'sync, IS mask' run; add that config or pass --no-extras")
    try:
        override = json.loads(args.override)
        GRPOConfig(**override)
    except (json.JSONDecodeError, TypeError) as e:
        p.error(f"--override {args.override!r}: {e}; write a JSON object of GRPOConfig fields")
    models = {"sft": args.model, "base": args.base}
    extras = {}
    if args.extras:
        replay = replay_effect(args.model)
        print(f"router replay, |logp_train - logp_gen| over {replay['tokens']} tokens (bf16 engine, fp32 trainer): "
              f"mean {replay['router_mean']:.4f} -> {replay['replay_mean']:.4f}, max {replay['router_max']:.3f} -> "
              f"{replay['replay_max']:.3f}", flush=True)
        sft_model, tok = build_model(GRPOConfig(model=args.model))
        cfg = GRPOConfig(**{**DEMO_SETTINGS, "model": args.model})
        acceptance_sft = draft_acceptance(sft_model.eval(), tok, load_envs(cfg), cfg, cfg.mtp_depths)
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for env in envs:
            for name in configs:
                which, overrides = CONFIGS[name]
                if not models[which]:
                    continue
                key = name if len(envs) == 1 else f"{env}: {name}"
                results[key] = []
                for seed in range(args.seeds):
                    out = os.path.join(tmp, f"{len(results)}_{seed}")
                    heal = ({"heal_mtp_steps": args.heal_steps} if args.extras and not results[key]
                            and name == "sync, IS mask" and env == envs[0] else {})
                    results[key].append(one_run(models[which], out, args.steps, seed,
                                                {"env": env, **ENV_SETTINGS[env], **override, **overrides, **heal}))
                    r = results[key][-1]
                    print(f"{key} seed {seed}: {r['before']:.3f} -> {r['after']:.3f} ({r['seconds']:.0f} s)",
                          flush=True)
    rows = [summarize(name, runs) for name, runs in results.items()]
    print_table(rows, COLUMNS)
    if args.extras:
        heal = results["sync, IS mask" if len(envs) == 1 else f"{envs[0]}: sync, IS mask"][0]["heal"]
        print(f"MTP draft acceptance: SFT model {acceptance_sft:.3f}, after RL {heal['before']:.3f}, after healing "
              f"{heal['after']:.3f}")
        extras = {"router_replay": replay, "mtp_acceptance": {"sft": acceptance_sft, "after_rl": heal["before"],
                                                              "after_healing": heal["after"]}}
    path = save(args.name, {"steps": args.steps, "seeds": args.seeds, "settings": DEMO_SETTINGS, "envs": envs,
                            "env_settings": {e: ENV_SETTINGS[e] for e in envs}, "override": override,
                            "models": models, "summary": rows, **extras, "runs": results})
    print(f"{path}\n{plot(results, args.name)}")


if __name__ == "__main__":
    main()
