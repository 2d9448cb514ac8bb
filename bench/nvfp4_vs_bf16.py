"""NVFP4 vs high-precision training, scaled down (white paper §2.4 Fig. 4: < 1% relative loss gap on Nano, 1T tokens),
with the recipe's ablations: the same model, data, seed and token budget in every run, only the GEMM formats differ.

    python bench/nvfp4_vs_bf16.py                                   # tiny hybrid, CPU, ~25 min on 2 cores
    python bench/nvfp4_vs_bf16.py --preset small --steps 2000 --seq-len 512 --batch-size 16    # on a GPU

Runs (all: --precision as named; the high-precision baseline is fp32 on CPU, bf16 autocast on CUDA):
    high        every GEMM in high precision: the baseline
    nvfp4       the Nemotron 3 recipe (train/pretrain.py --precision nvfp4; quant/recipe.py)
    no_rht      the recipe without the random Hadamard transform on wgrad
    no_sr       the recipe with round-to-nearest gradients instead of stochastic rounding
    all_nvfp4   every linear layer of the hybrid stack and MTP in NVFP4 (no high-precision tail, no MXFP8 out_proj)
    high_seed1  the baseline with another seed: the run-to-run noise floor that a gap must be read against
Reported: the relative held-out loss gap (L - L_high) / L_high at every evaluation (curve) and at the end; the
flush-to-zero shares the runs logged; step time of each run relative to the baseline (the emulation's overhead).
The held-out loss of a quantized run is measured with its quantized forward pass, as its training saw it.
Writes bench/results/nvfp4_vs_bf16.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, print_table, save  # noqa: E402

from nemotron3.train.pretrain import TrainConfig, train  # noqa: E402

VARIANTS = {
    "high": dict(precision="high"),
    "nvfp4": dict(precision="nvfp4"),
    "no_rht": dict(precision="nvfp4", nvfp4_no_rht=True),
    "no_sr": dict(precision="nvfp4", nvfp4_no_sr=True),
    "all_nvfp4": dict(precision="nvfp4", nvfp4_all=True),
    "high_seed1": dict(precision="high", seed=1),
}


def run(name: str, args, workdir: str) -> dict:
    import torch
    kw = dict(VARIANTS[name])
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if kw["precision"] == "high":
        kw["precision"] = "bf16" if cuda else "fp32"
    cfg = TrainConfig(out=os.path.join(workdir, name), preset=args.preset, max_steps=args.steps,
                      save_every=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                      eval_every=args.eval_every, eval_batches=args.eval_batches, device=args.device,
                      train_tokens=args.steps * args.batch_size * (args.seq_len + 1) + 50_000, **kw)
    train(cfg, log=lambda *_: None)
    rows = [json.loads(line) for line in open(os.path.join(cfg.out, "metrics.jsonl"))]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    speeds = [r["tokens_per_s"] for r in rows[len(rows) // 5:]]              # skip warm-up steps
    quant = {k: statistics.mean(r[k] for r in rows if k in r) for k in rows[-1] if k.startswith(("nvfp4_", "mxfp8_"))}
    return dict(variant=name, precision=cfg.precision, seed=cfg.seed, evals=evals, final_loss=evals[-1][1],
                tokens_per_s=statistics.median(speeds), **quant)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--name", default="nvfp4_vs_bf16", help="results file name under bench/results/")
    args = p.parse_args()
    if "high" not in args.variants:
        p.error("--variants must include high (the baseline every gap is measured against)")
    with tempfile.TemporaryDirectory() as workdir:
        results = []
        for name in args.variants:
            results.append(run(name, args, workdir))
            print(f"{name}: held-out loss {results[-1]['final_loss']:.4f}", flush=True)
    base = next(r for r in results if r["variant"] == "high")
    base_curve = dict(base["evals"])
    for r in results:
        r["gap_curve"] = [(s, 100 * (loss - base_curve[s]) / base_curve[s]) for s, loss in r["evals"] if s in base_curve]
        r["final_gap_pct"] = r["gap_curve"][-1][1]
        r["step_time_vs_high"] = base["tokens_per_s"] / r["tokens_per_s"]
    print_table(results, ["variant", "precision", "final_loss", "final_gap_pct", "step_time_vs_high", "tokens_per_s",
                          "nvfp4_ftz_act", "nvfp4_ftz_grad", "nvfp4_wgrad_zero", "mxfp8_ftz_act"])
    path = save(args.name, dict(config=vars(args), results=results,
                                paper="Nemotron 3 Nano NVFP4 vs BF16 at 1T tokens: < 1% relative loss gap"))
    _plot(results, os.path.join(RESULTS, f"{args.name}.png"), args)
    print(f"wrote {path}")


def _plot(results, path, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, r in enumerate(results):
        s, loss = zip(*r["evals"])
        a.plot(s, loss, label=r["variant"], color=f"C{i}")
        if r["variant"] != "high":
            s, gap = zip(*r["gap_curve"])
            b.plot(s, gap, label=f"{r['variant']} ({r['final_gap_pct']:+.2f}%)", color=f"C{i}")
    a.set(xlabel="step", ylabel="held-out loss (nats/token)", title=f"{args.preset}: held-out loss")
    a.set_yscale("log")
    b.axhline(1, color="gray", ls=":", lw=1)
    b.axhline(-1, color="gray", ls=":", lw=1)
    b.axhline(0, color="black", lw=0.8)
    b.set(xlabel="step", ylabel="relative gap vs high precision (%)", title="(L - L_high) / L_high; paper: < 1%")
    b.set_ylim(-5, 15)
    for ax in (a, b):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
