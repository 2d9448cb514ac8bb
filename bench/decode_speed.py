"""Decode speed of the inference engine, same run: ours vs transformers' `generate` on the same NemotronH weights,
plain (eager, compiled) vs MTP self-speculative decoding (compiled, K = 1..3), batch 1 and batch 8, with the draft
acceptance per position, for two models.

    python bench/decode_speed.py                       # trains both models first (~4 min), then ~6 min
    python bench/decode_speed.py --models demo=runs/demo/final --new-tokens 128

The models: the demo's tiny hybrid (M*ME-M*E, LatentMoE, one "*E" MTP block) and the `small` preset (11M, d=256)
with one "*E" MTP block, both trained briefly on the built-in corpus with the MTP loss, so their MTP heads draft
real text; prompts are held-out built-in documents. Speculative rows use the checkpoint's draft vocabulary where it
has one (FR-Spec: the drafter scores only the training data's most frequent tokens; training saves them for
vocabularies of 1024+ tokens, so `small`, V=8192, has one and the byte-vocabulary demo has none); one more row per
batch size drafts over the whole vocabulary (K=2) for comparison. Every configuration generates the same number of tokens (no eos
stop) and must produce the plain decoding's tokens (greedy). fp32, 2 threads (--threads). The "auto" row is the
engine's default speculation-by-batch-size rule (nemotron3.infer.engine.SPECULATION_BY_BATCH). Writes
bench/results/decode_speed.json and .png.
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
from nemotron3.infer.engine import SPECULATION_BY_BATCH  # noqa: E402
from nemotron3.tokenizer import ByteTokenizer  # noqa: E402
from nemotron3.train.data import builtin_tokens  # noqa: E402


def trained_model(workdir: str, preset: str, steps: int) -> str:
    from nemotron3 import from_preset
    from nemotron3.train.pretrain import TrainConfig, train
    overrides = {} if preset == "tiny" else dict(num_nextn_predict_layers=1, mtp_layers_block_type="*E")
    return train(TrainConfig(preset=preset, out=os.path.join(workdir, preset), max_steps=steps, save_every=steps,
                             eval_every=steps, seq_len=256, batch_size=8, lr=3e-3 if preset == "tiny" else 1e-3,
                             train_tokens=steps * 8 * 256 + 10_000),
                 log=lambda *_: None, model_config=from_preset(preset, **overrides))


def prompts(n: int, length: int) -> list[list[int]]:
    toks = builtin_tokens(ByteTokenizer(), n * (length + 50) + 1000, seed=123, split="heldout").tolist()
    return [toks[i * (length + 50):i * (length + 50) + length] for i in range(n)]


def time_ours(model, batch, new, K, draft_vocab="auto") -> tuple[float, list]:
    engine = Engine(model, None, num_speculative_tokens=K, max_batch=len(batch), draft_vocab=draft_vocab)
    reqs = [Request(p, new) for p in batch]
    engine.generate(reqs)                                                 # warm-up (and compilation, if any)
    best = 0.0
    for _ in range(2):
        engine.reset_stats()
        t0 = time.perf_counter()
        res = engine.generate(reqs)
        best = max(best, len(batch) * new / (time.perf_counter() - t0))
    assert all(len(r.token_ids) == new for r in res)
    return best, engine.acceptance(), [r.token_ids for r in res]


def time_hf(hf, batch, new) -> tuple[float, list]:
    ids = torch.tensor(batch)                                               # same length prompts: no padding
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    hf.generate(ids[:1], **kw)
    t0 = time.perf_counter()
    out = hf.generate(ids, **kw)
    dt = time.perf_counter() - t0
    return len(batch) * new / dt, out[:, ids.shape[1]:].tolist()


def bench_model(name, path, args) -> list[dict]:
    model = NemotronForCausalLM.from_pretrained(path).eval()
    from transformers import NemotronHForCausalLM
    hf = NemotronHForCausalLM.from_pretrained(path).eval()
    rows = []
    for b in args.batches:
        batch = prompts(b, args.prompt_len)
        hf_tps, hf_out = time_hf(hf, batch, args.new_tokens)
        model.compile_decode(False)
        plain_tps, _, plain_out = time_ours(model, batch, args.new_tokens, 0)
        base = dict(model=name, batch=b)
        rows.append(base | dict(method="transformers generate", tok_s=hf_tps, vs_transformers=1.0))
        rows.append(base | dict(method="ours, plain, eager", tok_s=plain_tps, vs_transformers=plain_tps / hf_tps,
                                same_tokens=plain_out == hf_out))
        model.compile_decode()                         # every step below runs through the compiled graphs
        comp_tps, _, out = time_ours(model, batch, args.new_tokens, 0)
        rows.append(base | dict(method="ours, plain, compiled", tok_s=comp_tps, vs_transformers=comp_tps / hf_tps,
                                vs_plain_compiled=1.0, same_tokens=out == plain_out))
        dv = model.draft_vocab
        variants = [(K, "auto", f"draft vocab {len(dv)}, " if dv is not None else "") for K in args.ks]
        if dv is not None:
            variants.append((2, None, "full-vocab drafts, "))
        for K, vocab, label in variants:
            tps, acc, out = time_ours(model, batch, args.new_tokens, K, vocab)
            rows.append(base | dict(method=f"ours, speculative K={K}, {label}compiled", tok_s=tps,
                                    vs_transformers=tps / hf_tps, vs_plain_compiled=tps / comp_tps,
                                    acceptance=[round(a, 3) for a in acc], same_tokens=out == plain_out))
        tps, acc, out = time_ours(model, batch, args.new_tokens, SPECULATION_BY_BATCH)
        rows.append(base | dict(method=f"ours, auto (K={Engine(model, None, SPECULATION_BY_BATCH).K_for(b)}), "
                                       f"compiled", tok_s=tps, vs_transformers=tps / hf_tps,
                                vs_plain_compiled=tps / comp_tps, acceptance=[round(a, 3) for a in acc],
                                same_tokens=out == plain_out))
        for r in rows[-len(variants) - 4:]:
            print(r, flush=True)
    model.compile_decode(False)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="*", default=[], help="NAME=DIR checkpoints with MTP heads (default: train "
                                                           "the demo model and small+MTP here)")
    p.add_argument("--train-steps", type=int, default=900)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 on a machine whose cores are busy: "
                                                          "a 2-thread step stalls at every barrier when they are)")
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        models = dict(m.split("=", 1) for m in args.models) or {
            "demo (tiny)": trained_model(workdir, "tiny", args.train_steps),
            "small + MTP": trained_model(workdir, "small", args.train_steps // 2)}
        for name, path in models.items():
            rows += bench_model(name, path, args)
    print_table(rows, ["model", "batch", "method", "tok_s", "vs_transformers", "vs_plain_compiled", "acceptance",
                       "same_tokens"])
    out = save("decode_speed", dict(config=vars(args), rows=rows))
    _plot(rows, "decode_speed")
    print(f"wrote {out}")


def _plot(rows, path):
    from common import new_figure, save_figure
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = new_figure(len(models), size=(7 * len(models), 4.5))
    for ax, model in zip(axes if len(models) > 1 else [axes], models):
        mine = [r for r in rows if r["model"] == model]
        batches = sorted({r["batch"] for r in mine})
        group = lambda r: r["method"].split(" (K=")[0]            # noqa: E731  "auto" is one bar whatever its K
        methods = list(dict.fromkeys(group(r) for r in mine))
        w = 0.8 / len(methods)
        for j, m in enumerate(methods):
            vals = [next((r["tok_s"] for r in mine if r["batch"] == b and group(r) == m), 0) for b in batches]
            ax.bar([i + j * w for i in range(len(batches))], vals, w, label=m)
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(batches))], [f"batch {b}" for b in batches])
        ax.set(ylabel="generated tokens / s",
               title=f"decode speed, {model}, {torch.get_num_threads()} threads, same run")
        ax.legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
