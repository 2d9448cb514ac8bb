"""Scaled-down analogues of the white paper's Table 1 (LatentMoE vs standard MoE at matched active parameters) and
Table 2 (with vs without MTP): same data, seeds and token budget, held-out loss and arithmetic accuracy over seeds.

    python bench/ablations.py                       # 3 variants x 3 seeds, ~15 min on 2 cores
    python bench/ablations.py --seeds 0 1 2 3 4 --steps 900

Variants on the `tiny` hybrid (d=64, M*ME-M*E):
    moe        standard MoE: 8 experts of m=32 in width d=64, top-2                 (no MTP loss)
    latent     LatentMoE, alpha = d/l = 4: 32 experts in l=16, top-6 (top-8 trimmed by the two d x l projections,
               as the paper trims 24 -> 22), so routed parameters and active parameters match `moe`   (no MTP loss)
    latent+mtp the same LatentMoE trained with the MTP loss, lambda = 0.3, D = 2 depths of one shared block
Everything else (data order, seeds, steps, learning rate) is identical. Reports mean and std over seeds; the paper's
claims are at 8B-active scale and 1T tokens, so a 0.2M-parameter, 1M-token run may or may not show them.
Writes bench/results/ablations.json and .png.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, print_table, save  # noqa: E402

from nemotron3 import NemotronForCausalLM, count_parameters, from_preset  # noqa: E402
from nemotron3.tokenizer import ByteTokenizer  # noqa: E402
from nemotron3.train.data import arithmetic_accuracy  # noqa: E402
from nemotron3.train.pretrain import TrainConfig, evaluate, build_data, train  # noqa: E402

VARIANTS = {
    "moe": (dict(moe_latent_size=None, n_routed_experts=8, num_experts_per_tok=2), 0),
    "latent": (dict(moe_latent_size=16, n_routed_experts=32, num_experts_per_tok=6), 0),
    "latent+mtp": (dict(moe_latent_size=16, n_routed_experts=32, num_experts_per_tok=6), 2),
}


def run(name: str, seed: int, steps: int, workdir: str) -> dict:
    overrides, mtp_depths = VARIANTS[name]
    config = from_preset("tiny", **overrides)
    cfg = TrainConfig(out=os.path.join(workdir, f"{name}-{seed}"), max_steps=steps, save_every=steps, seed=seed,
                      seq_len=256, batch_size=8, eval_every=steps, mtp_depths=mtp_depths,
                      train_tokens=steps * 8 * 256 + 10_000)
    final = train(cfg, log=lambda *_: None, model_config=config)
    model = NemotronForCausalLM.from_pretrained(final)
    _, heldout = build_data(TrainConfig(seed=0, seq_len=256, batch_size=8, eval_batches=16), ByteTokenizer())
    ev = evaluate(model, heldout, TrainConfig(seq_len=256, batch_size=8, eval_batches=16), 0)
    n = count_parameters(config)
    return dict(variant=name, seed=seed, heldout_loss=ev["eval_loss"], next_token_accuracy=ev["eval_accuracy"],
                arithmetic=arithmetic_accuracy(model, ByteTokenizer(), n=40), total_params=n["total"],
                active_params=n["active"])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = p.parse_args()
    workdir = tempfile.mkdtemp()
    runs = [run(v, s, args.steps, workdir) for v in args.variants for s in args.seeds]
    summary = []
    for v in args.variants:
        rs = [r for r in runs if r["variant"] == v]
        row = dict(variant=v, total_params=rs[0]["total_params"], active_params=rs[0]["active_params"])
        for key in ("heldout_loss", "next_token_accuracy", "arithmetic"):
            vals = [r[key] for r in rs]
            row[key] = statistics.mean(vals)
            row[key + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        summary.append(row)
    print(f"{len(args.seeds)} seeds x {args.steps} steps x {8 * 256} tokens; mean (std over seeds)")
    print_table(summary, ["variant", "total_params", "active_params", "heldout_loss", "heldout_loss_std",
                          "next_token_accuracy", "arithmetic", "arithmetic_std"])
    save("ablations", dict(summary=summary, runs=runs, steps=args.steps, seeds=args.seeds))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    for a, key, label in ((ax[0], "heldout_loss", "held-out loss (nats/byte)"), (ax[1], "arithmetic",
                                                                                "2-digit addition accuracy")):
        a.bar(range(len(summary)), [r[key] for r in summary], yerr=[r[key + "_std"] for r in summary], capsize=4,
              color=["#999999", "#8fbf40", "#76b900"][:len(summary)])
        for i, v in enumerate(args.variants):
            a.plot([i] * len(args.seeds), [r[key] for r in runs if r["variant"] == v], "k.", ms=4)
        a.set_xticks(range(len(summary)), [r["variant"] for r in summary])
        a.set_title(label, fontsize=9)
    lo = min(r["heldout_loss"] for r in runs)
    ax[0].set_ylim(lo * 0.95, max(r["heldout_loss"] for r in runs) * 1.02)
    fig.suptitle(f"ablations on the tiny hybrid, {len(args.seeds)} seeds, {args.steps} steps", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "ablations.png"), dpi=120)


if __name__ == "__main__":
    main()
