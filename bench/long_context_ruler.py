"""The paper's long-context claim at toy scale: does the hybrid (mostly Mamba, attention without positions) use long
contexts better than an all-attention NoPE model of equal parameters trained on the same tokens?

    python bench/long_context_ruler.py                        # 3 seeds x 2 models, both stages + evaluation
    python bench/long_context_ruler.py --seeds 0 --steps1 40 --steps2 10 --lengths 1024,4096 --samples 4   # smoke

Per seed and model: stage 1 trains from scratch on 1024-token rows of the built-in long documents (retrieval and
multi-hop tasks, train/long_docs.py; `nemotron3 train --mix 1024:1`), stage 2 is a short long-context stage on
4096-token rows mixing long and short documents (`--mix 4096:0.2,1024:0.8 --constant-lr`), then RULER-style
evaluation (eval/ruler.py, held-out seeds) at 1K ... the longest length asked, scored by the teacher-forced rank
of the gold answer among 9 distractor answers (accuracy = rank 0; chance 10%). Models: the `tiny` hybrid
(M*ME-M*E) and the same stack with M -> * at the attention width matching its total parameters
(bench/hybrid_vs_transformer.matched_transformer). Both see exactly the same rows in the same order.
Writes bench/results/long_context_ruler.json and .png (accuracy vs length, mean and per-seed points).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import new_figure, save, save_figure  # noqa: E402
from hybrid_vs_transformer import matched_transformer  # noqa: E402

import torch  # noqa: E402

from nemotron3 import NemotronForCausalLM, count_parameters, from_preset  # noqa: E402
from nemotron3.eval.ruler import evaluate, summarize  # noqa: E402
from nemotron3.tokenizer import ByteTokenizer  # noqa: E402
from nemotron3.train.pretrain import TrainConfig, train  # noqa: E402


def models() -> dict:
    hybrid = from_preset("tiny", max_position_embeddings=2**20)
    return {"hybrid": hybrid, "all_attention": matched_transformer(hybrid)}


def train_two_stages(name: str, cfg, seed: int, args, workdir: str) -> tuple[str, float]:
    """Stage 1 (1024-token rows) from scratch, then the long-context stage; returns (final dir, seconds)."""
    t0 = time.perf_counter()
    common = dict(batch_size=args.batch_size, eval_every=10**6, eval_batches=1, seed=seed, mtp_depths=1,
                  keep_last=1)
    stage1 = train(TrainConfig(out=os.path.join(workdir, f"{name}_{seed}_s1"), mix="1024:1", max_steps=args.steps1,
                               save_every=args.steps1, lr=args.lr, warmup_steps=10, **common),
                   log=lambda *_: None, model_config=cfg)
    final = train(TrainConfig(model=stage1, out=os.path.join(workdir, f"{name}_{seed}_s2"), mix=args.mix2,
                              max_steps=args.steps2, save_every=args.steps2, lr=args.lr2, constant_lr=True,
                              act_ckpt=True, **common), log=lambda *_: None)
    return final, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    ap.add_argument("--seeds", type=ints, default=[0, 1, 2])
    ap.add_argument("--steps1", type=int, default=100, help="stage-1 steps (1024-token rows)")
    ap.add_argument("--steps2", type=int, default=10, help="long-context stage steps")
    ap.add_argument("--mix2", default="4096:0.2,1024:0.8", help="the long-context stage's --mix")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--lr2", type=float, default=1e-3)
    ap.add_argument("--lengths", type=ints, default=[1024, 4096, 8192])
    ap.add_argument("--tasks", default="niah_single_1,niah_single_2,vt")
    ap.add_argument("--samples", type=int, default=4, help="samples per (task, length)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok, tasks = ByteTokenizer(), args.tasks.split(",")
    result = dict(config=vars(args), runs=[], params={n: count_parameters(c)["total"] for n, c in models().items()})
    workdir = tempfile.mkdtemp(prefix="lc_ruler_")
    for seed in args.seeds:
        for name, cfg in models().items():
            final, seconds = train_two_stages(name, cfg, seed, args, workdir)
            model = NemotronForCausalLM.from_pretrained(final).eval()
            with torch.inference_mode():
                records = evaluate(model, tok, tasks, args.lengths, args.samples, method="logprob", seed=1000 + seed,
                                   log=lambda *_: None)
            by_length = {}
            for row in summarize(records):
                by_length.setdefault(row["length"], []).append(row["tf_accuracy"])
            run = dict(model=name, seed=seed, train_seconds=round(seconds, 1), per_task=summarize(records),
                       accuracy={n: sum(v) / len(v) for n, v in by_length.items()},
                       last_train_loss=_last_loss(os.path.dirname(final)))
            result["runs"].append(run)
            print(json.dumps({k: run[k] for k in ("model", "seed", "train_seconds", "accuracy", "last_train_loss")}),
                  flush=True)
            save("long_context_ruler", result)
    plot(result, args.lengths)
    print("wrote bench/results/long_context_ruler.json")


def _last_loss(run_dir: str) -> float | None:
    path = os.path.join(run_dir, "metrics.jsonl")
    lines = open(path).read().splitlines() if os.path.exists(path) else []
    return json.loads(lines[-1])["loss"] if lines else None


def plot(result: dict, lengths: list[int]) -> None:
    fig, ax = new_figure(1, (7, 4.5))
    for i, name in enumerate(("hybrid", "all_attention")):
        runs = [r for r in result["runs"] if r["model"] == name]
        if not runs:
            continue
        accuracy = [{int(n): a for n, a in r["accuracy"].items()} for r in runs]    # JSON keys are strings
        for acc in accuracy:
            ax.plot(lengths, [acc[n] for n in lengths], "o", color=f"C{i}", alpha=0.35)
        mean = [sum(acc[n] for acc in accuracy) / len(runs) for n in lengths]
        ax.plot(lengths, mean, "-", color=f"C{i}", label=f"{name} ({result['params'][name]:,} params, "
                                                         f"{len(runs)} seeds)")
    ax.axhline(0.1, color="grey", ls=":", label="chance (1 of 10 candidates)")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="context length (tokens)", ylabel="teacher-forced accuracy", ylim=(0, 1.02),
           title="RULER-style, tiny models trained at <= 4K (CPU)")
    ax.legend(fontsize=8)
    save_figure(fig, "long_context_ruler")


if __name__ == "__main__":
    main()
