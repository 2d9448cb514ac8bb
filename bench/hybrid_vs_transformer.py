"""The white paper's Fig. 2 throughput claim, scaled down to a CPU: a hybrid Mamba/attention MoE against a
pure-attention MoE with the same total and active parameters, output tokens/s at a long-input / long-output
setting, and decode speed against context length.

    python bench/hybrid_vs_transformer.py                 # ~6 min on 2 cores
    python bench/hybrid_vs_transformer.py --input 8192 --output 1024 --contexts 512 2048 8192 16384

Models (random weights: throughput only): `small` (d=256, M*MEMEM*, 16 experts top-4) and the same stack with
every Mamba layer replaced by attention whose head count is chosen so total (and active) parameters match within a
few percent. The paper measures 8k input / 16k output on GPUs with large batches; here batch 1, fp32, 2 threads,
8k in / 1k out by default. Both decode with the same engine (plain greedy, no eos). Writes
bench/results/hybrid_vs_transformer.json and .png.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import new_figure, print_table, save, save_figure  # noqa: E402

import torch  # noqa: E402

from nemotron3 import NemotronForCausalLM, count_parameters, from_preset  # noqa: E402
from nemotron3.infer import Engine, Request  # noqa: E402


def matched_transformer(hybrid):
    """The hybrid's pattern with M -> *, and the attention width that best matches its total parameters."""
    pattern = hybrid.hybrid_override_pattern.replace("M", "*")
    target = count_parameters(hybrid)["total"]
    best = None
    for heads in range(2, 33, 2):
        for kv in (2, heads // 2, heads):
            if kv < 1 or heads % kv:
                continue
            cfg = hybrid.replace(layers_block_type=pattern, num_attention_heads=heads, num_key_value_heads=kv)
            gap = abs(count_parameters(cfg)["total"] - target) / target
            if best is None or gap < best[0]:
                best = (gap, cfg)
    return best[1]


def decode_rate(model, context: int, steps: int) -> float:
    """Greedy decode tokens/s after a `context`-token prompt (the decode steps alone are timed)."""
    torch.manual_seed(0)
    prompt = torch.randint(1, model.config.vocab_size, (1, context))
    with torch.inference_mode():
        cache = model.new_cache(1, context + steps + 1)
        tok = model(prompt, cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(steps):
            tok = model(tok, cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        return steps / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", type=int, default=8192)
    p.add_argument("--output", type=int, default=1024)
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192, 16384])
    p.add_argument("--steps", type=int, default=48, help="decode steps timed per context length")
    args = p.parse_args()
    hybrid_cfg = from_preset("small", max_position_embeddings=65536)
    trans_cfg = matched_transformer(hybrid_cfg)
    trans_cfg.max_position_embeddings = 65536
    models = {"hybrid": hybrid_cfg, "transformer": trans_cfg}
    rows, curve = [], {}
    for name, cfg in models.items():
        torch.manual_seed(0)
        model = NemotronForCausalLM(cfg).eval()
        n = count_parameters(cfg)
        torch.manual_seed(1)
        prompt = torch.randint(1, cfg.vocab_size, (args.input,)).tolist()
        t0 = time.perf_counter()
        Engine(model, None).generate([Request(prompt, args.output)])
        total = time.perf_counter() - t0
        rows.append(dict(model=name, pattern=cfg.hybrid_override_pattern, total_params=n["total"],
                         active_params=n["active"], output_tok_s=args.output / total, seconds=total))
        curve[name] = [(c, decode_rate(model, c, args.steps)) for c in args.contexts]
        print(rows[-1], curve[name], flush=True)
    rows[1]["hybrid_speedup"] = rows[0]["output_tok_s"] / rows[1]["output_tok_s"]
    print(f"{args.input} in / {args.output} out, batch 1, fp32, {torch.get_num_threads()} threads")
    print_table(rows, ["model", "pattern", "total_params", "active_params", "output_tok_s", "seconds",
                       "hybrid_speedup"])
    print_table([dict(context=c, hybrid=h, transformer=t, ratio=h / t)
                 for (c, h), (_, t) in zip(curve["hybrid"], curve["transformer"])],
                ["context", "hybrid", "transformer", "ratio"])
    path = save("hybrid_vs_transformer", dict(config=vars(args), rows=rows, decode_tok_s_vs_context=curve,
                                              paper="Nano 3 vs Qwen3-30B-A3B, 8k in / 16k out: 3.3x throughput"))
    fig, (a, b) = new_figure(2, (11, 4.2))
    a.bar([r["model"] for r in rows], [r["output_tok_s"] for r in rows], color=["C0", "C1"])
    a.set(ylabel="output tokens / s", title=f"{args.input} in / {args.output} out, batch 1 (CPU)")
    for name, pts in curve.items():
        b.plot(*zip(*pts), "o-", label=name)
    b.set_xscale("log")
    b.set(xlabel="context length", ylabel="decode tokens / s", title="decode speed vs context")
    b.legend()
    save_figure(fig, "hybrid_vs_transformer")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
