"""Accuracy vs thinking budget (the white paper's accuracy-vs-budget trade-off, Fig. 3, scaled down): the demo
model answers held-out additions with its reasoning cut by the engine's budget control at N thinking tokens.

    python bench/budget_curve.py --model runs/demo/final          # after `make demo`; ~2 min
    python bench/budget_curve.py                                   # trains the demo model first

Prompts are the built-in corpus's "Q: a+b=?\\n<think>"; the budget closes a thought with ".</think>\\n" (the format
this model learned; NVIDIA's models use ".\\n</think>\\n\\n"), then the model writes "A: <sum>". The demo's thoughts
have no newlines, so the grace window is 0: the cut comes exactly at N tokens. Budget "none" is
free reasoning. Also reported: mean thinking tokens actually used. Writes bench/results/budget_curve.json / .png.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import new_figure, print_table, save, save_figure  # noqa: E402

from nemotron3 import NemotronForCausalLM  # noqa: E402
from nemotron3.infer import Engine, Request  # noqa: E402
from nemotron3.tokenizer import ByteTokenizer  # noqa: E402
from nemotron3.train.data import arithmetic_prompts  # noqa: E402


def answer_of(text: str) -> int | None:
    tail = text.split("</think>", 1)[-1]
    digits = "".join(c for c in tail.split("A:", 1)[-1].strip().split("\n")[0] if c.isdigit())
    return int(digits) if digits else None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--n", type=int, default=200, help="held-out additions per budget")
    p.add_argument("--budgets", type=int, nargs="+", default=[0, 1, 2, 3, 4, 6, 8, 12, 16])
    p.add_argument("--num-speculative-tokens", type=int, default=0)
    args = p.parse_args()
    tok = ByteTokenizer()
    with tempfile.TemporaryDirectory() as workdir:
        path = args.model
        if path is None:
            from nemotron3.train.pretrain import TrainConfig, train
            path = train(TrainConfig(out=workdir, max_steps=900, save_every=900, eval_every=900, seq_len=256,
                                     batch_size=8), log=lambda *_: None)
        model = NemotronForCausalLM.from_pretrained(path).eval()
    problems = arithmetic_prompts(args.n, seed=7)
    engine = Engine(model, tok, num_speculative_tokens=args.num_speculative_tokens)
    rows = []
    for budget in [None] + args.budgets:
        reqs = [Request(tok.encode(q), 48, thinking=True, reasoning_budget=budget, thought_close=".</think>\n",
                        budget_grace=0,
                        stop=["\nQ:"]) for q, _ in problems]
        res = []
        for i in range(0, len(reqs), 50):
            res += engine.generate(reqs[i:i + 50])
        correct = sum(answer_of(r.text) == ans for r, (_, ans) in zip(res, problems))
        think = [len(tok.encode(r.text.split("</think>", 1)[0])) for r in res]
        rows.append(dict(budget="none" if budget is None else budget, accuracy=correct / len(res),
                         mean_thinking_tokens=sum(think) / len(think),
                         forced=sum(r.budget_forced for r in res) / len(res)))
        print(rows[-1], flush=True)
    print_table(rows, ["budget", "accuracy", "mean_thinking_tokens", "forced"])
    out = save("budget_curve", dict(config=vars(args), rows=rows))
    fig, ax = new_figure(1, (7, 4.5))
    pts = [r for r in rows if r["budget"] != "none"]
    ax.plot([r["mean_thinking_tokens"] for r in pts], [r["accuracy"] for r in pts], "o-", label="budget N")
    for r in pts:
        ax.annotate(str(r["budget"]), (r["mean_thinking_tokens"], r["accuracy"]), fontsize=8,
                    textcoords="offset points", xytext=(3, -10))
    free = rows[0]
    ax.axhline(free["accuracy"], color="gray", ls=":", label=f"no budget ({free['mean_thinking_tokens']:.1f} tokens)")
    ax.set(xlabel="mean thinking tokens used", ylabel="accuracy (held-out additions)",
           title="accuracy vs reasoning budget, demo model")
    ax.legend()
    save_figure(fig, "budget_curve")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
