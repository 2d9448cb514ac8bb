"""The paper's long-context claim at toy scale: does the hybrid (mostly Mamba, attention without positions) use long
contexts better than an all-attention NoPE model of equal parameters trained on the same tokens?

    python bench/long_context_ruler.py --jobs 2                # 3 seeds x 2 models, both stages + evaluation
    python bench/long_context_ruler.py --seeds 0 --steps1 40 --steps2 4 --lengths 1024,4096 --samples 4   # smoke

Per seed and model: stage 1 trains from scratch on 1024-token rows of the built-in long documents (retrieval and
multi-hop tasks, train/long_docs.py; `nemotron3 train --mix 1024:1 --answer-weight 20`: the answer line weighs 20
times a haystack token), stage 2 is a short long-context stage on
16384-token rows mixing long and short documents (`--mix 16384:0.25,1024:0.75 --constant-lr --act-ckpt`), then
RULER-style evaluation (eval/ruler.py, held-out sample seeds) at 1K ... the longest length asked, scored by the
teacher-forced rank of the gold answer among 9 distractor answers (accuracy = rank 0; chance 10%). Models: the
`tiny` hybrid (M*ME-M*E) and the same stack with M -> * at the attention width matching its total parameters
(bench/hybrid_vs_transformer.matched_transformer). Both see exactly the same rows in the same order.
Each (task, length) cell reports its accuracy with the binomial standard error sqrt(p (1 - p) / n); each length's
mean over seeds comes with the spread (standard deviation) across seeds. --jobs runs (seed, model) pairs in
parallel processes of one thread each. Writes bench/results/long_context_ruler.json and .png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import new_figure, save, save_figure  # noqa: E402
from hybrid_vs_transformer import matched_transformer  # noqa: E402

import torch  # noqa: E402

from nemotron3 import NemotronForCausalLM, count_parameters, from_preset  # noqa: E402
from nemotron3.eval.ruler import evaluate, summarize  # noqa: E402
from nemotron3.tokenizer import ByteTokenizer  # noqa: E402
from nemotron3.train.pretrain import TrainConfig, train  # noqa: E402

MODELS = ("hybrid", "all_attention")


def models() -> dict:
    hybrid = from_preset("tiny", max_position_embeddings=2**20)
    return {"hybrid": hybrid, "all_attention": matched_transformer(hybrid)}


def train_two_stages(name: str, seed: int, args, workdir: str) -> tuple[str, float, float]:
    """Stage 1 (--mix1 rows) from scratch, then the long-context stage; (final dir, seconds of each stage)."""
    common = dict(eval_every=10**6, eval_batches=1, seed=seed, mtp_depths=1, keep_last=1,
                  answer_weight=args.answer_weight, long_tasks=args.long_tasks)
    t0 = time.perf_counter()
    stage1 = train(TrainConfig(out=os.path.join(workdir, f"{name}_{seed}_s1"), mix=args.mix1, max_steps=args.steps1,
                               save_every=args.steps1, lr=args.lr, warmup_steps=args.warmup,
                               batch_size=args.batch_size, **common), log=lambda *_: None, model_config=models()[name])
    t1 = time.perf_counter()
    if args.steps2 == 0:
        return stage1, t1 - t0, 0.0
    final = train(TrainConfig(model=stage1, out=os.path.join(workdir, f"{name}_{seed}_s2"), mix=args.mix2,
                              max_steps=args.steps2, save_every=args.steps2, lr=args.lr2, constant_lr=True,
                              act_ckpt=True, batch_size=args.batch_size2, **common), log=lambda *_: None)
    return final, t1 - t0, time.perf_counter() - t1


def run_one(name: str, seed: int, args, workdir: str) -> dict:
    """Train one model for one seed and evaluate it; the run's record."""
    torch.set_num_threads(1)
    final, seconds1, seconds2 = train_two_stages(name, seed, args, workdir)
    model = NemotronForCausalLM.from_pretrained(final).eval()
    tok, tasks, records = ByteTokenizer(), args.tasks.split(","), []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for length, samples in zip(args.lengths, args.samples):
            records += evaluate(model, tok, tasks, [length], samples, method="logprob", seed=1000 + seed,
                                log=lambda *_: None)
    per_task = summarize(records)
    for row in per_task:
        p, n = row["tf_accuracy"], row["samples"]
        row["stderr"] = math.sqrt(p * (1 - p) / n)                    # binomial: sqrt(p (1 - p) / n)
    accuracy = {}
    for length in args.lengths:                                       # pooled over the tasks' samples
        hits = [r["tf_correct"] for r in records if r["length"] == length]
        accuracy[length] = sum(hits) / len(hits)
    return dict(model=name, seed=seed, train_seconds=[round(seconds1, 1), round(seconds2, 1)],
                eval_seconds=round(time.perf_counter() - t0, 1), per_task=per_task, accuracy=accuracy,
                last_train_loss=_last_loss(os.path.dirname(final)),
                depth_records=[{k: r[k] for k in ("task", "length", "depth", "rank")} for r in records])


def _last_loss(run_dir: str) -> float | None:
    path = os.path.join(run_dir, "metrics.jsonl")
    lines = open(path).read().splitlines() if os.path.exists(path) else []
    return json.loads(lines[-1])["loss"] if lines else None


def across_seeds(runs: list[dict], lengths: list[int]) -> dict:
    """Per model and length: mean accuracy over seeds, its standard deviation across seeds, the seeds."""
    out = {}
    for name in MODELS:
        rs = [r for r in runs if r["model"] == name]
        for n in lengths:
            acc = [r["accuracy"][n] for r in rs]
            if acc:
                mean = sum(acc) / len(acc)
                sd = math.sqrt(sum((a - mean) ** 2 for a in acc) / (len(acc) - 1)) if len(acc) > 1 else 0.0
                out.setdefault(name, {})[n] = dict(mean=mean, sd_across_seeds=sd, seeds=len(acc))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    ap.add_argument("--seeds", type=ints, default=[0, 1, 2])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {MODELS}")
    ap.add_argument("--steps1", type=int, default=800, help="stage-1 steps (--mix1 rows)")
    ap.add_argument("--mix1", default="1024:1", help="stage 1's --mix (its rows' length is the training length)")
    ap.add_argument("--long-tasks", default="", help="the training documents' task kinds (pretrain --long-tasks; "
                    "empty: all of train/long_docs.TRAIN_TASKS)")
    ap.add_argument("--batch-size", type=int, default=4, help="stage-1 rows per step")
    ap.add_argument("--lr", type=float, default=3e-3, help="stage-1 peak learning rate (WSD)")
    ap.add_argument("--answer-weight", type=float, default=20.0,
                    help="loss weight of each document's answer tokens (pretrain --answer-weight; 1 = plain LM loss)")
    ap.add_argument("--warmup", type=int, default=20, help="stage-1 warmup steps")
    ap.add_argument("--steps2", type=int, default=20, help="long-context stage steps (0: no stage 2)")
    ap.add_argument("--mix2", default="16384:0.25,1024:0.75", help="the long-context stage's --mix")
    ap.add_argument("--batch-size2", type=int, default=1, help="long-context stage rows per step")
    ap.add_argument("--lr2", type=float, default=5e-4, help="long-context stage constant learning rate")
    ap.add_argument("--lengths", type=ints, default=[1024, 4096, 16384, 65536])
    ap.add_argument("--tasks", default="niah_single_1,niah_single_2,niah_multikey_1,vt")
    ap.add_argument("--samples", type=ints, default=[30, 30, 12, 4],
                    help="samples per task at each length (one number: the same at every length)")
    ap.add_argument("--jobs", type=int, default=1, help="(seed, model) runs in parallel, one thread each")
    ap.add_argument("--append", action="store_true", help="add these seeds' runs to bench/results/"
                    "long_context_ruler.json (made with the same settings otherwise); runs already there are kept")
    args = ap.parse_args()
    if len(args.samples) == 1:
        args.samples = args.samples * len(args.lengths)
    if len(args.samples) != len(args.lengths):
        raise ValueError(f"--samples gives {len(args.samples)} counts for {len(args.lengths)} --lengths; give one "
                         f"count per length or a single count.")
    names = args.models.split(",")
    if unknown := [n for n in names if n not in MODELS]:
        raise ValueError(f"--models: unknown {unknown}; choose from {MODELS}.")
    torch.set_num_threads(1)
    params = {n: count_parameters(c)["total"] for n, c in models().items()}
    result = dict(config=vars(args), runs=[], params=params)
    if args.append:
        result = previous_results(args, params)
    workdir = tempfile.mkdtemp(prefix="lc_ruler_")
    done = {(r["model"], r["seed"]) for r in result["runs"]}
    jobs = [(name, seed) for seed in args.seeds for name in names if (name, seed) not in done]
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_one, name, seed, args, workdir) for name, seed in jobs]
        for future in as_completed(futures):
            run = future.result()
            result["runs"].append(run)
            result["runs"].sort(key=lambda r: (r["seed"], MODELS.index(r["model"])))
            result["across_seeds"] = across_seeds(result["runs"], args.lengths)
            print(json.dumps({k: run[k] for k in ("model", "seed", "train_seconds", "eval_seconds", "accuracy",
                                                  "last_train_loss")}), flush=True)
            save("long_context_ruler", result)
    plot(result, args.lengths)
    print_table(result, args.lengths)
    print("wrote bench/results/long_context_ruler.json and .png")


def previous_results(args, params: dict) -> dict:
    """The committed results, to add runs to: refused unless every setting but --seeds / --jobs / --append matches."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "long_context_ruler.json")
    if not os.path.exists(path):
        raise SystemExit(f"--append: {path} does not exist yet; run without --append first.")
    with open(path) as f:
        old = json.load(f)
    ignored = {"seeds", "jobs", "append"}
    theirs = {k: v for k, v in old["config"].items() if k not in ignored}
    ours = {k: v for k, v in vars(args).items() if k not in ignored}
    if theirs != ours or old["params"] != params:
        diff = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
        raise SystemExit(f"--append: the committed runs used other settings ({', '.join(diff) or 'model sizes'}); "
                         f"rerun with theirs or without --append.")
    old["config"] = vars(args) | {"seeds": sorted({r["seed"] for r in old["runs"]} | set(args.seeds))}
    for run in old["runs"]:                           # JSON made the lengths strings; the new runs key them by int
        run["accuracy"] = {int(n): a for n, a in run["accuracy"].items()}
    return old


def print_table(result: dict, lengths: list[int]) -> None:
    """Mean accuracy over seeds +- the spread across seeds, per model and length."""
    print(f"{'model':<16}" + "".join(f"{n:>16}" for n in lengths))
    for name, by_length in result["across_seeds"].items():
        cells = [(100 * by_length[n]["mean"], 100 * by_length[n]["sd_across_seeds"]) for n in lengths]
        print(f"{name:<16}" + "".join(f"{mean:>9.1f} +-{sd:>4.1f}" for mean, sd in cells))


def plot(result: dict, lengths: list[int]) -> None:
    fig, ax = new_figure(1, (7, 4.5))
    for i, name in enumerate(MODELS):
        runs = [r for r in result["runs"] if r["model"] == name]
        if not runs:
            continue
        for r in runs:
            ax.plot(lengths, [r["accuracy"][n] for n in lengths], "o", color=f"C{i}", alpha=0.35)
        stats = result["across_seeds"][name]
        ax.errorbar(lengths, [stats[n]["mean"] for n in lengths], yerr=[stats[n]["sd_across_seeds"] for n in lengths],
                    fmt="-", capsize=3, color=f"C{i}",
                    label=f"{name} ({result['params'][name]:,} params, {len(runs)} seeds; bars: sd across seeds)")
    ax.axhline(0.1, color="grey", ls=":", label="chance (1 of 10 candidates)")
    train_len = max(int(part.split(":")[0]) for part in result["config"]["mix1"].split(","))
    ax.axvline(train_len, color="grey", ls="--", lw=0.8, label=f"stage-1 row length ({train_len})")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="context length (tokens)", ylabel="teacher-forced accuracy", ylim=(0, 1.02),
           title=f"RULER-style, tiny models trained at {train_len}"
                 + (" (+ a short long-context stage)" if result["config"]["steps2"] else "") + ", CPU")
    ax.legend(fontsize=7)
    save_figure(fig, "long_context_ruler")


if __name__ == "__main__":
    main()
