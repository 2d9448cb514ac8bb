"""`nemotron3 plot RUN_DIR`: loss, learning rate, throughput and expert-load curves from metrics.jsonl to PNG.

    nemotron3 plot runs/tiny            # writes runs/tiny/training.png (also written at the end of every run)
"""

from __future__ import annotations

import argparse
import json
import os


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist; is {run_dir} a training run directory?")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_run(run_dir: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl is empty; nothing to plot yet.")
    step = [r["step"] for r in rows]
    fig, ax = plt.subplots(2, 2, figsize=(11, 7))
    ax[0, 0].plot(step, [r["loss"] for r in rows], label="train loss", lw=1)
    ev = [r for r in rows if "eval_loss" in r]
    ax[0, 0].plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="held-out loss")
    for k in range(1, 9):
        if f"mtp{k}_loss" in rows[-1]:
            ax[0, 0].plot(step, [r.get(f"mtp{k}_loss") for r in rows], lw=0.8, alpha=0.7, label=f"MTP depth {k} loss")
    ax[0, 0].set(xlabel="step", ylabel="cross-entropy (nats)", title="loss")
    ax[0, 0].legend(fontsize=7)
    ax[0, 1].plot(step, [r["lr"] for r in rows])
    ax[0, 1].set(xlabel="step", title="learning rate (WSD)")
    ax[1, 0].plot(step, [r["tokens_per_s"] for r in rows], lw=0.8)
    ax[1, 0].set(xlabel="step", title="training tokens/s")
    for key in sorted(k for k in rows[-1] if k.endswith("_max_over_mean")):
        ax[1, 1].plot(step, [r.get(key) for r in rows], lw=0.8, label=key.replace("_max_over_mean", ""))
    ax[1, 1].axhline(1, color="gray", lw=0.5)
    ax[1, 1].set(xlabel="step", title="expert load, max / mean per MoE layer (1 = balanced)")
    if ax[1, 1].lines[1:]:
        ax[1, 1].legend(fontsize=7)
    fig.tight_layout()
    out = os.path.join(run_dir, "training.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="nemotron3 plot", description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    args = p.parse_args(argv)
    print(plot_run(args.run_dir))
