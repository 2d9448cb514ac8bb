"""RULER-style long-context evaluation, built in (no download):

    nemotron3 eval ruler --model runs/long/final --lengths 1k,4k,16k --samples 20 --out runs/long/ruler
    nemotron3 eval ruler --model DIR --lengths 256k,1m --method logprob --tasks niah_single_2,vt
    nemotron3 eval ruler --preset tiny --lengths 512 --samples 2          # a smoke run on random weights

The synthetic tasks of RULER (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context
Language Models?"), the benchmark the Nemotron 3 paper reports at up to 1M tokens (RULER-100 @1M: 86.3):
    niah_single_1..3      one needle "One of the special magic numbers for KEY is: VALUE." in a haystack of a
                          repeated noise passage (1), essay-like text (2), or essay text with a UUID value (3)
    niah_multikey_1..3    the queried needle among 3 other needles (1), or a haystack made only of needles with
                          other word keys (2) or UUID keys and values (3)
    niah_multivalue       four values under the same key, all asked for
    niah_multiquery       four keys, all asked for at once
    vt                    variable tracking: a chain VAR A = 12345, VAR B = VAR A, ... (4 hops) in noise;
                          name every variable holding the value
    cwe                   common-word extraction: a numbered word list, 10 words 30 times each, the rest 3 times
    fwe                   frequent-word extraction: coded words drawn from a Zipf(alpha=2) law; the top three
RULER's QA tasks (SQuAD, HotpotQA) need downloaded data and are left out, as are its chat templates and the
one-shot example it puts before vt and cwe: prompts are plain text ending in the answer prefix, as for a base model.

A sample's prompt has exactly `length` tokens with the model's own tokenizer (haystack.fit_exact). Needles sit at
evenly spaced depths: sample i of N puts its queried needle at depth i / (N - 1) (0 = first, 1 = last position of
the haystack) and a task's other needles at the same spacing after it, (depth + j/m) mod 1. Sample seeds are
strings in their own namespace ("nemotron3-ruler/task/length/seed/index"); the training documents of
train/long_docs.py draw from "nemotron3-longdoc/...", so no evaluation sample is a training document.

Scoring, RULER's way: greedy generation after the answer prefix, score = fraction of the gold strings found in
the output (case-insensitive), averaged over samples. And, cheap enough at 1M (one prefill, no decoding), the
teacher-forced log-probability of the gold answer against `distractors` answers of the same form (other needles'
values first): the gold's rank, accuracy = rank 0 (chance 1 / (distractors + 1)); see nll.candidate_logprobs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from dataclasses import dataclass

from .haystack import (NOISE_PASSAGE, Units, coded_word, distinct, essay_sentences, fit_exact, pseudo_word,
                       random_key, random_number, random_uuid, variable_name)

EVAL_NAMESPACE = "nemotron3-ruler"


@dataclass(frozen=True)
class Task:
    kind: str
    """niah | vt | cwe | fwe"""
    haystack: str = "essay"
    """niah: essay (essay-like sentences), noise (one passage repeated) or needle (needles with other keys)"""
    key_type: str = "words"
    """niah keys: words (adjective-noun) or uuids"""
    value_type: str = "numbers"
    """niah values: numbers (7 digits) or uuids"""
    num_keys: int = 1
    """niah: needles with different keys in the haystack"""
    num_values: int = 1
    """niah: values under each key"""
    num_queries: int = 1
    """niah: keys asked for (the first num_queries of the num_keys)"""
    max_new_tokens: int = 128
    """generation budget after the answer prefix (RULER's per-task value)"""


TASKS = {
    "niah_single_1": Task("niah", haystack="noise"),
    "niah_single_2": Task("niah"),
    "niah_single_3": Task("niah", value_type="uuids"),
    "niah_multikey_1": Task("niah", num_keys=4),
    "niah_multikey_2": Task("niah", haystack="needle"),
    "niah_multikey_3": Task("niah", haystack="needle", key_type="uuids", value_type="uuids"),
    "niah_multivalue": Task("niah", num_values=4),
    "niah_multiquery": Task("niah", num_keys=4, num_queries=4),
    "vt": Task("vt", max_new_tokens=30),
    "cwe": Task("cwe", max_new_tokens=120),
    "fwe": Task("fwe", max_new_tokens=50),
}
VT_HOPS = 4                                   # chain of 5 variables
CWE_COMMON, CWE_COMMON_FREQ, CWE_RARE_FREQ = 10, 30, 3
FWE_ALPHA, FWE_VOCAB = 2.0, 1000


@dataclass
class Sample:
    task: str
    length: int
    """tokens of `prompt` with the tokenizer it was made for"""
    index: int
    prompt: str
    """task text, haystack, question and answer prefix: the model continues it"""
    answers: list[str]
    """gold strings; the generation score is the fraction found in the output"""
    candidates: list[str]
    """teacher-forced continuations: candidates[0] is the gold answer, the rest distractors of the same form"""
    depth: float | None = None
    """where the (first) queried needle sits in the haystack, 0..1 (niah, vt)"""
    max_new_tokens: int = 128


def _join_keys(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


def _insert(units: list[str], items: list[str], depths: list[float]) -> list[str]:
    """units with items[j] inserted before unit round(depths[j] * len(units)) (depth 1 = after the last)."""
    at = {}
    for item, d in zip(items, depths):
        at.setdefault(round(d * len(units)), []).append(item)
    out = []
    for i in range(len(units) + 1):
        out += at.get(i, [])
        if i < len(units):
            out.append(units[i])
    return out


def _niah(spec: Task, rng: random.Random, key: str, depth: float, distractors: int):
    draw_key = random_key if spec.key_type == "words" else random_uuid
    draw_value = random_number if spec.value_type == "numbers" else random_uuid
    kind = "numbers" if spec.value_type == "numbers" else "uuids"
    keys = distinct(draw_key, rng, spec.num_keys)
    values = distinct(draw_value, rng, spec.num_keys * spec.num_values)
    pairs = [(k, values[i * spec.num_values + j]) for i, k in enumerate(keys) for j in range(spec.num_values)]
    needles = [f"One of the special magic {kind} for {k} is: {v}." for k, v in pairs]
    depths = [(depth + j / len(needles)) % 1.0 if j else depth for j in range(len(needles))]
    hay_rng = random.Random(key + "/haystack")
    if spec.haystack == "essay":
        units, sep = Units(essay_sentences(hay_rng)), " "
    elif spec.haystack == "noise":
        units, sep = Units(iter(lambda: NOISE_PASSAGE, None)), " "
    else:
        def other_needles():
            while True:
                k = draw_key(hay_rng)
                if k not in keys:
                    yield f"One of the special magic {kind} for {k} is: {draw_value(hay_rng)}."
        units, sep = Units(other_needles()), "\n"
    queried = keys[:spec.num_queries]
    answers = [v for k, v in pairs if k in queried]
    query = _join_keys(queried)
    head = (f"Some special magic {kind} are hidden within the following text. Make sure to memorize it. I will "
            f"quiz you about the {kind} afterwards.\n")
    tail = (f"\nWhat are all the special magic {kind} for {query} mentioned in the provided text? "
            f"The special magic {kind} for {query} mentioned in the provided text are")

    def render(n: int, pad: int) -> str:
        return head + sep.join(_insert(units.take(n), needles, depths)) + units.pad(n, pad, sep) + tail
    pool = [v for k, v in pairs if k not in queried] + distinct(draw_value, rng, distractors * len(answers), values)
    wrong = [pool[i * len(answers):(i + 1) * len(answers)] for i in range(distractors)]
    candidates = [" " + ", ".join(a) for a in [answers] + wrong]
    return render, answers, candidates


def _vt(rng: random.Random, depth: float, distractors: int):
    names = distinct(variable_name, rng, VT_HOPS + 1)
    value = random_number(rng, 5)
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[j + 1]} = VAR {names[j]}." for j in range(VT_HOPS)]
    depths = sorted((depth + j / len(chain)) % 1.0 for j in range(len(chain)))    # the chain stays in order
    units, sep = Units(iter(lambda: NOISE_PASSAGE, None)), "\n"
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    tail = (f"\nQuestion: Find all variables that are assigned the value {value} in the text above. Answer: "
            f"According to the chain(s) of variable assignment in the text above, {len(names)} variables are "
            f"assigned the value {value}, they are: ")

    def render(n: int, pad: int) -> str:
        return head + sep.join(_insert(units.take(n), chain, depths)) + units.pad(n, pad, sep) + tail
    wrong = [distinct(variable_name, rng, len(names), names) for _ in range(distractors)]
    return render, names, [" ".join(a) for a in [names] + wrong]


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def _cwe(rng: random.Random, key: str, length: int, count, distractors: int):
    common = distinct(pseudo_word, rng, CWE_COMMON)

    def rare_words():
        seen = set(common)
        while True:
            w = pseudo_word(rng)
            if w not in seen:
                seen.add(w)
                yield w
    rare = Units(rare_words())
    head = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
            "ones that appear most often.\n")
    tail = (f"\nQuestion: What are the {CWE_COMMON} most common words in the above list? Answer: The top "
            f"{CWE_COMMON} words that appear most often in the list are:")
    # RULER's 30 repeats of each common word do not fit a short prompt: there the common words repeat fewer times
    # (always more than the rare words' 3), taking at most half of the prompt
    freq = next((f for f in (CWE_COMMON_FREQ, 20, 10, 6) if 2 * count(_numbered(common * f)) <= length),
                CWE_RARE_FREQ + 1)

    def render(n: int, pad: int) -> str:
        words = common * freq + rare.take(n) * CWE_RARE_FREQ
        random.Random(f"{key}/{n}").shuffle(words)
        return head + _numbered(words) + rare.pad(n, pad, " ") + tail

    def wrong(i: int) -> list[str]:
        return rare.take(CWE_COMMON * (i + 1))[CWE_COMMON * i:]
    return render, common, [" " + ", ".join(a) for a in [common] + [wrong(i) for i in range(distractors)]]


def _fwe(rng: random.Random, key: str, distractors: int):
    vocab = ["...."] + distinct(coded_word, rng, FWE_VOCAB - 1)      # rank 1 is noise, as in RULER
    zeta = sum(k ** -FWE_ALPHA for k in range(1, 100_000))
    head = ("Read the following coded text and track the frequency of each coded word. Find the three most "
            "frequently appeared coded words. ")
    tail = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
            "frequently appeared words in the above coded text? Answer: According to the coded text above, the "
            "three most frequently appeared words are:")

    def counts(n: int) -> list[int]:
        return [int(n * (k + 1) ** -FWE_ALPHA / zeta) for k in range(len(vocab))]   # Zipf: n k^-a / zeta(a)

    def clear_top3(n: int) -> int:
        """The largest m <= n whose 3rd and 4th coded words differ in count (ties only occur below ~75 words)."""
        while n > 0 and not counts(n)[3] > counts(n)[4]:
            n -= 1
        return n

    def render(n: int, pad: int) -> str:
        words = [w for w, c in zip(vocab, counts(clear_top3(n))) for _ in range(c)]
        random.Random(f"{key}/{n}").shuffle(words)
        return head + " ".join(words) + (" ...." * (pad // 5 + 1))[:pad] + tail
    answers = vocab[1:4]
    wrong = [vocab[4 + 3 * i:7 + 3 * i] for i in range(distractors)]
    return render, answers, [" " + ", ".join(a) for a in [answers] + wrong], clear_top3


def make_sample(task: str, length: int, index: int, tokenizer, *, depth: float = 0.5, seed: int = 0,
                distractors: int = 9, namespace: str = EVAL_NAMESPACE) -> Sample:
    """One deterministic sample of `task` whose prompt has exactly `length` tokens with `tokenizer`."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; choose from {', '.join(TASKS)}.")
    spec = TASKS[task]
    key = f"{namespace}/{task}/{length}/{seed}/{index}"
    rng = random.Random(key)

    def count(text: str) -> int:
        return len(tokenizer.encode(text))
    what = f"{task} at length {length}"
    if spec.kind == "niah":
        render, answers, candidates = _niah(spec, rng, key, depth, distractors)
    elif spec.kind == "vt":
        render, answers, candidates = _vt(rng, depth, distractors)
    elif spec.kind == "cwe":
        render, answers, candidates = _cwe(rng, key, length, count, distractors)
    else:
        render, answers, candidates, clear_top3 = _fwe(rng, key, distractors)
    prompt, n = fit_exact(render, count, length, what)
    if spec.kind == "fwe" and clear_top3(n) == 0:
        raise ValueError(f"{what}: too short for a clear top three (the 3rd and 4th words are equally frequent); "
                         f"ask for a longer length (~500 tokens suffice).")
    return Sample(task, length, index, prompt, answers, candidates,
                  depth if spec.kind in ("niah", "vt") else None, spec.max_new_tokens)


def make_samples(task: str, length: int, n: int, tokenizer, seed: int = 0, distractors: int = 9,
                 namespace: str = EVAL_NAMESPACE) -> list[Sample]:
    """n samples with needle depths evenly spaced over [0, 1] (0.5 for a single sample)."""
    return [make_sample(task, length, i, tokenizer, depth=i / (n - 1) if n > 1 else 0.5, seed=seed,
                        distractors=distractors, namespace=namespace) for i in range(n)]


def string_match_all(prediction: str, answers: list[str]) -> float:
    """RULER's metric: the fraction of gold strings that occur in the prediction, case-insensitive (control
    characters count as line breaks, as in RULER's post-processing)."""
    pred = re.sub(r"[\x00-\x1f]", "\n", prediction).strip().lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


# ---- running a model on the tasks ----
METHODS = ("generate", "logprob", "both")


def evaluate(model, tokenizer, tasks: list[str], lengths: list[int], samples: int, method: str = "both",
             seed: int = 0, distractors: int = 9, prefill_chunk: int = 2048, log=print) -> list[dict]:
    """One record per sample: the generated answer and its score (method generate / both), the gold's
    teacher-forced log-probability and rank among the candidates (logprob / both). Candidates are tokenized on
    their own, not together with the prompt: every one then starts from the same prefilled context (a BPE could
    merge the prompt's last characters with a candidate's first; our prompts end before a space or after one)."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} must be one of {METHODS}.")
    from ..infer import Engine, Request, SamplingParams
    from .nll import candidate_logprobs, rank_of_first
    # no positional encoding: any length runs, so the engine accepts the longest prompt asked + its answer
    longest = max(lengths) + max(TASKS[t].max_new_tokens for t in tasks)
    engine = Engine(model, tokenizer, prefill_chunk=prefill_chunk, max_batch=1,
                    max_model_len=longest) if method in ("generate", "both") else None
    records = []
    for length in lengths:
        for task in tasks:
            for s in make_samples(task, length, samples, tokenizer, seed, distractors):
                ids = tokenizer.encode(s.prompt)
                rec = {"task": task, "length": length, "index": s.index, "depth": s.depth, "answers": s.answers}
                if engine is not None:
                    req = Request(ids, s.max_new_tokens, sampling=SamplingParams(temperature=0.0))
                    rec["prediction"] = engine.generate([req])[0].text
                    rec["score"] = string_match_all(rec["prediction"], s.answers)
                if method in ("logprob", "both"):
                    scores = candidate_logprobs(model, ids, [tokenizer.encode(c) for c in s.candidates],
                                                prefill_chunk)
                    rec["gold_logprob"], rec["rank"] = float(scores[0]), rank_of_first(scores)
                    rec["tf_correct"] = float(rec["rank"] == 0)
                records.append(rec)
            row = summarize([r for r in records if r["task"] == task and r["length"] == length])[0]
            log(f"{task:>16} @ {length:>8}: " + ", ".join(f"{k} {row[k]:.1%}" for k in ("score", "tf_accuracy")
                                                         if k in row))
    return records


def summarize(records: list[dict]) -> list[dict]:
    """Mean score / teacher-forced accuracy / rank per (task, length), in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["task"], r["length"]), []).append(r)
    out = []
    for (task, length), rs in groups.items():
        row = {"task": task, "length": length, "samples": len(rs)}
        for key, name in (("score", "score"), ("tf_correct", "tf_accuracy"), ("rank", "mean_rank")):
            if key in rs[0]:
                row[name] = sum(r[key] for r in rs) / len(rs)
        out.append(row)
    return out


def format_length(n: int) -> str:
    for unit, size in (("m", 1 << 20), ("k", 1 << 10)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def table(summary: list[dict], metric: str) -> str:
    """Tasks down, lengths across, `metric` in percent, with the average over tasks last."""
    tasks = list(dict.fromkeys(r["task"] for r in summary))
    lengths = list(dict.fromkeys(r["length"] for r in summary))
    cell = {(r["task"], r["length"]): r[metric] for r in summary if metric in r}
    lines = [f"{metric + ' (%)':<18}" + "".join(f"{format_length(n):>8}" for n in lengths)]
    for t in tasks:
        lines.append(f"{t:<18}" + "".join(f"{100 * cell[t, n]:>8.1f}" for n in lengths))
    lines.append(f"{'average':<18}" + "".join(
        f"{100 * sum(cell[t, n] for t in tasks) / len(tasks):>8.1f}" for n in lengths))
    return "\n".join(lines)


def _plot(plt, summary: list[dict], records: list[dict], samples: int):
    """Left: accuracy vs length per task (generation score solid, teacher-forced accuracy dashed). Right: NIAH
    accuracy by needle depth x length (mean over the NIAH tasks)."""
    niah = [r for r in records if r["task"].startswith("niah")]
    fig, axes = plt.subplots(1, 2 if niah else 1, figsize=(12 if niah else 6, 4.5), squeeze=False)
    ax = axes[0, 0]
    lengths = list(dict.fromkeys(r["length"] for r in summary))
    colors = plt.get_cmap("tab20").colors
    for i, task in enumerate(dict.fromkeys(r["task"] for r in summary)):
        rows = {r["length"]: r for r in summary if r["task"] == task}
        shown = [m for m in ("score", "tf_accuracy") if m in rows[lengths[0]]]
        for metric in shown:
            ax.plot(lengths, [100 * rows[n][metric] for n in lengths], "-o" if metric == "score" else "--x",
                    color=colors[(2 * i) % 20], label=task if metric == shown[0] else None)
    ax.set_title("solid: generation score, dashed: teacher-forced accuracy", fontsize=9)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [format_length(n) for n in lengths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-3, 103)
    ax.legend(fontsize=6)
    if niah:
        metric = "score" if "score" in niah[0] else "tf_correct"
        if samples <= 10:                         # one row per depth the samples used: i / (samples - 1)
            bins = samples
            row_of = lambda d: round(d * (bins - 1))                                   # noqa: E731
            labels = [f"{100 * i / max(bins - 1, 1):.0f}%" if bins > 1 else "50%" for i in range(bins)]
        else:                                     # ten bands of depth
            bins = 10
            row_of = lambda d: min(int(d * bins), bins - 1)                           # noqa: E731
            labels = [f"{10 * i}-{10 * i + 10}%" for i in range(bins)]
        grid = [[[] for _ in lengths] for _ in range(bins)]
        for r in niah:
            grid[row_of(r["depth"])][lengths.index(r["length"])].append(r[metric])
        cells = [[100 * sum(c) / len(c) if c else float("nan") for c in row] for row in grid]
        im = axes[0, 1].imshow(cells, aspect="auto", cmap="RdYlGn", vmin=0, vmax=100, origin="upper")
        axes[0, 1].set_xticks(range(len(lengths)), [format_length(n) for n in lengths])
        axes[0, 1].set_yticks(range(bins), labels)
        axes[0, 1].set_xlabel("prompt length (tokens)")
        axes[0, 1].set_ylabel("needle depth")
        axes[0, 1].set_title(f"NIAH {'score' if metric == 'score' else 'teacher-forced accuracy'} (%)")
        fig.colorbar(im, ax=axes[0, 1])
    return fig


def main(argv) -> None:
    from ..tokenizer import load_tokenizer
    from . import load_model, parse_length, save_plot
    p = argparse.ArgumentParser(prog="nemotron3 eval ruler", description="RULER's synthetic long-context tasks, "
                                "generated here with exact token counts, scored by generation and teacher forcing.")
    p.add_argument("--model", help="checkpoint directory")
    p.add_argument("--preset", help="random weights of a built-in architecture (a smoke run)")
    p.add_argument("--lengths", default="4k,16k", help="prompt lengths in tokens, e.g. 4k,16k,64k,256k,1m "
                   "(k = 1024, m = 1048576; default 4k,16k)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from: {', '.join(TASKS)} (default all)")
    p.add_argument("--samples", type=int, default=10, help="samples per task and length, needle depths evenly "
                   "spaced over them (default 10)")
    p.add_argument("--method", choices=METHODS, default="both", help="generate: greedy answer, RULER's string "
                   "match; logprob: rank of the gold answer among distractors (no decoding: cheap at 1M); both")
    p.add_argument("--distractors", type=int, default=9, help="wrong answers per sample for --method logprob "
                   "(default 9: chance is 10%%)")
    p.add_argument("--prefill-chunk", type=int, default=2048, help="tokens per forward in teacher forcing")
    p.add_argument("--seed", type=int, default=0, help="sample seed (and --preset weights)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    p.add_argument("--device", default="auto", help="cuda, cpu, cuda:1, ... (default auto: CUDA if present)")
    p.add_argument("--out", default=None, help="directory for ruler.json and ruler.png")
    args = p.parse_args(argv)
    lengths = [parse_length(x, "--lengths") for x in args.lengths.split(",")]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"--tasks {args.tasks!r}: unknown task(s) {', '.join(unknown) or '(none given)'}; choose "
                         f"from {', '.join(TASKS)}.")
    for flag, value in (("--samples", args.samples), ("--distractors", args.distractors),
                        ("--prefill-chunk", args.prefill_chunk)):
        if value < 1:
            raise ValueError(f"{flag} {value} must be >= 1.")
    model = load_model(args)
    tok = load_tokenizer(args.model, model.config.vocab_size)
    records = evaluate(model, tok, tasks, lengths, args.samples, args.method, args.seed, args.distractors,
                       args.prefill_chunk, log=lambda msg: print(msg, file=sys.stderr))
    summary = summarize(records)
    for metric in ("score", "tf_accuracy"):
        if metric in summary[0]:
            print(table(summary, metric) + "\n")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "ruler.json"), "w") as f:
            json.dump({"model": args.model or args.preset, "args": vars(args), "summary": summary,
                       "samples": records}, f, indent=1)
        save_plot(os.path.join(args.out, "ruler.png"), lambda plt: _plot(plt, summary, records, args.samples))
        print(f"wrote {os.path.join(args.out, 'ruler.json')} and ruler.png")
