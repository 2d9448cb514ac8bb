"""Training throughput: our full training step vs transformers' NemotronH on the same config, weights and batch.

    python bench/train_speed.py                       # small (4 x 512) and medium (2 x 512), ~3 min on 2 cores
    python bench/train_speed.py --configs small --steps 5

A step is what a trainer does: forward with labels, backward, gradient clipping, AdamW (and for ours the
aux-loss-free bias update and the sequence aux loss, as `nemotron3 train` runs them; the benchmark configs have
no MTP heads, so both sides predict one token). Median tokens/s over the timed steps after one warm-up step,
both models in the same process and the same run. Writes bench/results/train_speed.json and .png.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, print_table, save  # noqa: E402
from model_speed import SHAPES, load_hf  # noqa: E402

from nemotron3 import NemotronForCausalLM, from_preset  # noqa: E402
from nemotron3.model.moe import MoE  # noqa: E402
from nemotron3.train.balance import sequence_aux_loss, update_expert_bias  # noqa: E402


def ours_step(model, opt, ids):
    out = model(ids, labels=ids, return_router=True)
    loss = out.loss + sum(sequence_aux_loss(r.scores_TE, ids.shape[0], r.ids_TK.shape[1]) for r in out.router.values())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    for m in model.modules():
        if isinstance(m, MoE):          # the layer counted its routed tokens in training mode (as the trainer reads)
            update_expert_bias(m.gate.e_score_correction_bias, m.tokens_per_expert)
            m.tokens_per_expert.zero_()


def hf_step(model, opt, ids):
    model(ids, labels=ids).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def timed(step, steps):
    step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=["small", "medium"], choices=list(SHAPES))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.configs:
        torch.manual_seed(0)
        ours = NemotronForCausalLM(from_preset(name)).train()
        tmp = tempfile.mkdtemp()
        ours.save_pretrained(tmp)
        hf = load_hf(tmp).train()
        b, L = SHAPES[name]["train"]
        ids = torch.randint(0, ours.config.vocab_size, (b, L), generator=torch.Generator().manual_seed(0))
        opt_o = torch.optim.AdamW(ours.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
        opt_h = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
        t_o = timed(lambda: ours_step(ours, opt_o, ids), args.steps)
        t_h = timed(lambda: hf_step(hf, opt_h, ids), args.steps)
        rows.append(dict(config=name, batch=f"{b}x{L}", ours=b * L / t_o, transformers=b * L / t_h, ratio=t_h / t_o))
    print("training step tokens/s (forward + backward + clip + AdamW), same run")
    print_table(rows, ["config", "batch", "ours", "transformers", "ratio"])
    save("train_speed", dict(rows=rows))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.4))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["transformers"] for r in rows], 0.4, label="transformers", color="#cc7a00")
    ax.bar([i + 0.2 for i in x], [r["ours"] for r in rows], 0.4, label="nemotron3", color="#76b900")
    ax.set_xticks(list(x), [f"{r['config']}\n{r['batch']}" for r in rows])
    ax.set_ylabel("training tokens/s")
    ax.set_yscale("log")
    for i, r in enumerate(rows):
        ax.text(i + 0.2, r["ours"], f"{r['ratio']:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "train_speed.png"), dpi=120)


if __name__ == "__main__":
    main()
