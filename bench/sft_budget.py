"""Accuracy vs reasoning budget after SFT, thinking on and off (the scaled-down shape of Nemotron 3's
accuracy-vs-budget curve, NANO Fig. 8): the demo recipe's SFT'd model answers held-out multi-step additions and
follow-ups of the built-in chat set with its thought cut by the engine's budget control after N tokens.

    python bench/sft_budget.py                          # pretrains the demo base once, then 3 SFT seeds; ~25 min
    python bench/sft_budget.py --base runs/demo/pretrain/final --seeds 0 1 2

One pretraining run (the demo's: `nemotron3 demo` recipe, seed 0), then one SFT run per seed (data order and
budget-control draws differ: 10% reasoning off, 3% cut at a random budget, as Nano's SFT), each evaluated through
the engine (train/chat_eval.py) with thinking off (the prompt ends "<think></think>"), with budgets of N thinking
tokens (the engine forces ".\\n</think>\\n\\n" at N, exactly: no grace), and unlimited. Reported per setting: mean
and spread (min / max) of the accuracy over seeds, and the mean thinking tokens used. The reference thoughts are
7-20 bytes ("3+8=11, 11-4=7."), so budgets past ~20 are the same as none. Writes bench/results/sft_budget.json/.png.
Measured (base: the demo's 900-step pretraining, seed 0; SFT seeds 0-2; 52 items): thinking off 7%, budgets 0 / 4 /
8 about 4%, 12: 12%, 16: 28%, unlimited 34% (31-40%) at 12.3 thinking tokens: accuracy comes only with the whole
worked sum, and a cut thought does worse than thinking off (only 3% of SFT samples are truncated: a few dozen in 150
steps). 17 min on 2 loaded cores (one thread).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import new_figure, print_table, save, save_figure  # noqa: E402

from nemotron3 import NemotronForCausalLM  # noqa: E402
from nemotron3.demo import pretrain_config, sft_config  # noqa: E402
from nemotron3.infer import Engine  # noqa: E402
from nemotron3.tokenizer import ByteTokenizer  # noqa: E402
from nemotron3.train import chat_eval as ce  # noqa: E402
from nemotron3.train.pretrain import train  # noqa: E402
from nemotron3.train.sft import train_sft  # noqa: E402


def settings(budgets):
    """(label, thinking, budget) in plot order: off, each budget, unlimited."""
    return [("off", False, None)] + [(str(b), True, b) for b in budgets] + [("none", True, None)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default=None, help="a pretrained model (default: pretrain the demo's base first)")
    p.add_argument("--pretrain-steps", type=int, default=900)
    p.add_argument("--sft-steps", type=int, default=150)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--conversations", type=int, default=120, help="held-out conversations (~40%% are reasoning tasks)")
    p.add_argument("--budgets", type=int, nargs="+", default=[0, 4, 8, 12, 16])
    args = p.parse_args()
    tok = ByteTokenizer()
    quiet = lambda *_: None                                                     # noqa: E731
    items = [i for i in ce.eval_items(args.conversations, seed=0)
             if i.task in ce.REASONING_TASKS and i.kind == "answer"]
    per_seed = {label: [] for label, _, _ in settings(args.budgets)}
    thinking = {label: [] for label in per_seed}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        base = args.base or train(pretrain_config(os.path.join(work, "pretrain"), args.pretrain_steps), log=quiet)
        print(f"base model: {base} [{time.perf_counter() - t0:.0f}s]", flush=True)
        for seed in args.seeds:
            tuned = train_sft(sft_config(base, os.path.join(work, f"sft{seed}"), args.sft_steps, seed), log=quiet)
            engine = Engine(NemotronForCausalLM.from_pretrained(tuned).eval(), tok)
            for label, on, budget in settings(args.budgets):
                replies = ce.run_items(engine, tok, items, thinking=on, budget=budget)
                per_seed[label].append(ce.accuracy(replies))
                thinking[label].append(ce.thinking_tokens(replies, tok))
            print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in per_seed.items()) +
                  f" [{time.perf_counter() - t0:.0f}s]", flush=True)
    rows = [dict(budget=label, accuracy=sum(a) / len(a), min=min(a), max=max(a),
                 mean_thinking_tokens=sum(thinking[label]) / len(a), per_seed=a) for label, a in per_seed.items()]
    print(f"\n{len(items)} held-out reasoning items, {len(args.seeds)} SFT seeds")
    print_table(rows, ["budget", "accuracy", "min", "max", "mean_thinking_tokens"])
    out = save("sft_budget", dict(config=vars(args), items=len(items), rows=rows,
                                  seconds=round(time.perf_counter() - t0)))
    fig, ax = new_figure(1, (7, 4.5))
    pts = [r for r in rows if r["budget"] not in ("off", "none")]
    x = [r["mean_thinking_tokens"] for r in pts]
    ax.errorbar(x, [r["accuracy"] for r in pts], yerr=[[r["accuracy"] - r["min"] for r in pts],
                                                       [r["max"] - r["accuracy"] for r in pts]],
                fmt="o-", capsize=3, label="thinking on, budget N (min-max over seeds)")
    for r, xi in zip(pts, x):
        ax.annotate(str(r["budget"]), (xi, r["accuracy"]), fontsize=8, textcoords="offset points", xytext=(3, -10))
    off, free = rows[0], rows[-1]
    ax.axhline(free["accuracy"], color="gray", ls=":", label=f"no budget ({free['mean_thinking_tokens']:.1f} tokens)")
    ax.axhline(off["accuracy"], color="tab:red", ls="--", label="thinking off")
    ax.set(xlabel="mean thinking tokens used", ylabel="accuracy (held-out multi-step additions)", ylim=(0, 1.02),
           title=f"accuracy vs reasoning budget after SFT ({len(args.seeds)} seeds)")
    ax.legend()
    save_figure(fig, "sft_budget")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
