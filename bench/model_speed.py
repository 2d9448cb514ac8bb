"""Ours vs transformers' NemotronH on the same weights, in one run, as ratios.

    python bench/model_speed.py                      # both configs (small ~11M, medium ~290M), ~5 min on 2 cores
    python bench/model_speed.py --configs small      # one config
    python bench/model_speed.py --threads 2          # torch threads (default 2, as the published baseline)

Measures, per config: training-step tokens/s (forward with labels + backward, each library's own loss; batch
4 x 512 for small, 2 x 512 for medium), prefill tokens/s (batch 4 x 512, no grad), and cached greedy decode tokens/s at batch 1 and 4
(prompt 16, 128 new tokens), eager and with compile_decode(), each for ours and for transformers' generate
(float32, sdpa, grouped_mm experts, pure-torch Mamba as on any CPU), whose tokens must be the same. Beside the decode figures: the
memory roofline = measured copy bandwidth / active fp32 weight bytes per decode step. Writes
bench/results/model_speed.json and .png. transformers is a test/bench-only dependency (`pip install -e .[dev]`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, best_time, memory_bandwidth_gbs, print_table, save  # noqa: E402

from nemotron3 import NemotronForCausalLM, count_parameters, from_preset  # noqa: E402

SHAPES = {"small": dict(train=(4, 512), prefill=(4, 512)), "medium": dict(train=(2, 512), prefill=(4, 512))}


def load_hf(path):
    import transformers
    transformers.logging.set_verbosity_error()
    hf = transformers.NemotronHForCausalLM.from_pretrained(path).eval()
    for m in hf.modules():             # same math as ours (see tests/hf_utils.py); does not change HF's speed
        if hasattr(m, "time_step_limit"):
            m.time_step_limit = (0.0, float("inf"))
    return hf


def train_step(model, ids):
    """Each library's own training step: forward with labels=ids (next-token loss, shifted inside), backward.
    transformers materialises float32 logits and calls cross_entropy; ours fuses the loss with the LM head."""
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()


def bench_config(name: str, repeats: int, new_tokens: int) -> dict:
    cfg = from_preset(name)
    torch.manual_seed(0)
    ours = NemotronForCausalLM(cfg).eval()
    tmp = tempfile.mkdtemp()
    ours.save_pretrained(tmp)
    hf = load_hf(tmp)
    g = torch.Generator().manual_seed(0)
    rows = []

    b, L = SHAPES[name]["train"]
    ids = torch.randint(0, cfg.vocab_size, (b, L), generator=g)
    ours.train(), hf.train()
    loss_ours, loss_hf = ours(ids, labels=ids).loss.item(), hf(ids, labels=ids).loss.item()
    assert abs(loss_ours - loss_hf) < 1e-4, (loss_ours, loss_hf)          # the same step, not just a fast one
    t_ours = best_time(lambda: train_step(ours, ids), repeats)
    t_hf = best_time(lambda: train_step(hf, ids), repeats)
    ours.eval(), hf.eval()
    rows.append(dict(config=name, measure=f"train fwd+bwd {b}x{L}", ours=b * L / t_ours, hf=b * L / t_hf))

    b, L = SHAPES[name]["prefill"]
    ids = torch.randint(0, cfg.vocab_size, (b, L), generator=g)
    with torch.inference_mode():
        t_ours = best_time(lambda: ours(ids), repeats)
        t_hf = best_time(lambda: hf(ids), repeats)
    rows.append(dict(config=name, measure=f"prefill {b}x{L}", ours=b * L / t_ours, hf=b * L / t_hf))

    hf_gen = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    for compiled in (False, True):
        if compiled:
            ours.compile_decode()
        for b in (1, 4):
            prompt = torch.randint(0, cfg.vocab_size, (b, 16), generator=g)
            a = ours.generate(prompt, max_new_tokens=new_tokens)          # also warms up (and compiles)
            h = hf.generate(prompt, max_new_tokens=new_tokens, **hf_gen)
            t_ours = best_time(lambda: ours.generate(prompt, max_new_tokens=new_tokens), repeats + 2, warmup=0)
            t_hf = best_time(lambda: hf.generate(prompt, max_new_tokens=new_tokens, **hf_gen), repeats + 2, warmup=0)
            rows.append(dict(config=name, measure=f"decode b={b} (16+{new_tokens}){' compiled' if compiled else ''}",
                             ours=b * new_tokens / t_ours, hf=b * new_tokens / t_hf, same_tokens=bool(torch.equal(a, h))))
    for r in rows:
        r["ratio"] = r["ours"] / r["hf"]
    n = count_parameters(cfg)
    # decode reads every active weight once per step (the embedding row is negligible, the head is not)
    rows.append(dict(config=name, measure="active fp32 MB / decode step",
                     ours=(n["active"] - cfg.vocab_size * cfg.hidden_size) * 4 / 1e6))
    return dict(rows=rows, params=n)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in rows if "ratio" in r]
    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [f"{r['config']}\n{r['measure']}" for r in rows]
    ax.bar(range(len(rows)), [r["ratio"] for r in rows], color="#76b900")
    ax.axhline(1, color="gray", lw=1)
    for y, what in ((2, "train target 2x"), (3, "decode target 3x")):
        ax.axhline(y, color="gray", lw=0.8, ls="--")
        ax.text(len(rows) - 0.5, y, what, ha="right", va="bottom", fontsize=7, color="gray")
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("speed-up vs transformers (same run)")
    ax.set_title("nemotron3 vs transformers NemotronH, float32 CPU")
    for i, r in enumerate(rows):
        ax.text(i, r["ratio"], f"{r['ratio']:.1f}x", ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=["small", "medium"], choices=list(SHAPES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    bw = memory_bandwidth_gbs()
    rows, params = [], {}
    for name in args.configs:
        res = bench_config(name, args.repeats, args.new_tokens)
        mb = res["rows"][-1]["ours"]
        res["rows"][-1]["hf"] = None
        res["rows"][-1]["roofline tok/s"] = bw * 1e3 / mb
        rows += res["rows"]
        params[name] = res["params"]
    print(f"copy bandwidth {bw:.1f} GB/s; tokens/s unless noted; ratio = ours / transformers")
    print_table(rows, ["config", "measure", "ours", "hf", "ratio", "same_tokens", "roofline tok/s"])
    save("model_speed", dict(rows=rows, params=params, bandwidth_gbs=bw))
    plot(rows, os.path.join(RESULTS, "model_speed.png"))


if __name__ == "__main__":
    main()
