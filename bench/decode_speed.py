"""Decode speed of the inference engine, same run: ours vs transformers' `generate` on the same NemotronH weights,
MTP self-speculative vs plain decoding, batch 1 and batch 8, with the draft acceptance per position.

    python bench/decode_speed.py                       # trains the demo model first (~2 min), then ~4 min
    python bench/decode_speed.py --model runs/demo/final --new-tokens 128

The model is the demo's tiny hybrid (M*ME-M*E, LatentMoE, one MTP block) trained on the built-in corpus, so its
MTP head drafts real text; prompts are held-out built-in documents. Every configuration generates the same number
of tokens (no eos stop). fp32, the machine's threads. Writes bench/results/decode_speed.json and .png.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, print_table, save  # noqa: E402

import torch  # noqa: E402

from nemotron3 import NemotronForCausalLM  # noqa: E402
from nemotron3.infer import Engine, Request  # noqa: E402
from nemotron3.tokenizer import ByteTokenizer  # noqa: E402
from nemotron3.train.data import builtin_tokens  # noqa: E402


def demo_model(workdir: str, steps: int) -> str:
    from nemotron3.train.pretrain import TrainConfig, train
    return train(TrainConfig(out=os.path.join(workdir, "demo"), max_steps=steps, save_every=steps, eval_every=steps,
                             seq_len=256, batch_size=8), log=lambda *_: None)


def prompts(n: int, length: int) -> list[list[int]]:
    toks = builtin_tokens(ByteTokenizer(), n * (length + 50) + 1000, seed=123, split="heldout").tolist()
    return [toks[i * (length + 50):i * (length + 50) + length] for i in range(n)]


def time_ours(model, batch, new, K) -> tuple[float, list]:
    engine = Engine(model, None, num_speculative_tokens=K)
    reqs = [Request(p, new) for p in batch]
    engine.generate(reqs)                                                 # warm-up (and compilation, if any)
    engine.reset_stats()
    t0 = time.perf_counter()
    res = engine.generate(reqs)
    dt = time.perf_counter() - t0
    assert all(len(r.token_ids) == new for r in res)
    return len(batch) * new / dt, engine.acceptance(), [r.token_ids for r in res]


def time_hf(hf, batch, new) -> tuple[float, list]:
    ids = torch.tensor(batch)                                               # same length prompts: no padding
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    hf.generate(ids[:1], **kw)
    t0 = time.perf_counter()
    out = hf.generate(ids, **kw)
    dt = time.perf_counter() - t0
    return len(batch) * new / dt, out[:, ids.shape[1]:].tolist()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="a checkpoint with MTP heads (default: train the demo model)")
    p.add_argument("--train-steps", type=int, default=900)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3])
    args = p.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as workdir:
        path = args.model or demo_model(workdir, args.train_steps)
        model = NemotronForCausalLM.from_pretrained(path).eval()
        from transformers import NemotronHForCausalLM
        hf = NemotronHForCausalLM.from_pretrained(path).eval()
    rows = []
    for b in args.batches:
        batch = prompts(b, args.prompt_len)
        hf_tps, hf_out = time_hf(hf, batch, args.new_tokens)
        plain_tps, _, plain_out = time_ours(model, batch, args.new_tokens, 0)
        rows.append(dict(batch=b, method="transformers generate", tok_s=hf_tps, vs_transformers=1.0))
        rows.append(dict(batch=b, method="ours, plain", tok_s=plain_tps, vs_transformers=plain_tps / hf_tps,
                         vs_plain=1.0, same_tokens_as_hf=plain_out == hf_out))
        model.compile_decode()                         # plain decoding through the one-graph compiled step
        tps, _, out = time_ours(model, batch, args.new_tokens, 0)
        model.compile_decode(False)
        rows.append(dict(batch=b, method="ours, plain, compile_decode", tok_s=tps, vs_transformers=tps / hf_tps,
                         vs_plain=tps / plain_tps, same_tokens_as_plain=out == plain_out))
        for K in args.ks:
            tps, acc, out = time_ours(model, batch, args.new_tokens, K)
            rows.append(dict(batch=b, method=f"ours, MTP speculative K={K}", tok_s=tps, vs_transformers=tps / hf_tps,
                             vs_plain=tps / plain_tps, acceptance=[round(a, 3) for a in acc],
                             same_tokens_as_plain=out == plain_out))
            print(rows[-1], flush=True)
    print_table(rows, ["batch", "method", "tok_s", "vs_transformers", "vs_plain", "acceptance", "same_tokens_as_plain",
                       "same_tokens_as_hf"])
    out = save("decode_speed", dict(config=vars(args), rows=rows))
    _plot(rows, os.path.join(RESULTS, "decode_speed.png"))
    print(f"wrote {out}")


def _plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    batches = sorted({r["batch"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    w = 0.8 / len(methods)
    for j, m in enumerate(methods):
        vals = [next((r["tok_s"] for r in rows if r["batch"] == b and r["method"] == m), 0) for b in batches]
        ax.bar([i + j * w for i in range(len(batches))], vals, w, label=m)
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(batches))], [f"batch {b}" for b in batches])
    ax.set(ylabel="generated tokens / s", title="decode speed, demo model (tiny hybrid + MTP), same run")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
