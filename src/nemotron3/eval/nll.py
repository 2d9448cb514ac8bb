"""Teacher-forced log-likelihoods over long inputs: per-token NLL through a chunked prefill, the log-probability of
candidate continuations after one shared prefill, and the cumulative mean NLL vs position with a power-law fit.

    nemotron3 eval nll --model runs/long/final --data books.jsonl --max-len 65536 --out runs/long/nll
    nemotron3 eval nll --model DIR --data builtin --max-len 16k       # the built-in long documents (held out)

The curve is the analogue of the Nemotron-H / Nemotron 3 long-context figure (after Gemini 1.5's): for each
position t, the mean over documents of the NLL of token t, then its running mean C(t) = (1/t) sum_{i<=t} nll_i,
fitted by C(t) = a * t^(-b) + c. A model that keeps using its context has C(t) falling steadily (b > 0) out to
the longest position; a curve that flattens or turns up marks where it stops.

Every forward here goes through `model(ids, cache=cache, logits_to_keep=...)` in chunks, so peak activation
memory is set by --prefill-chunk, not by the length, and the KV / SSM cache carries the context across chunks.
Documents shorter than --max-len are skipped (a position is then averaged over the same documents everywhere);
longer ones are cut.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os

import torch


def _check_chunk(chunk: int) -> None:
    if chunk < 1:
        raise ValueError(f"--prefill-chunk {chunk} must be >= 1.")


@torch.inference_mode()
def token_nll(model, ids: list[int], chunk: int = 2048) -> torch.Tensor:
    """-log p(ids[t] | ids[:t]) for t = 1..L-1, (L-1,) float64, from one chunked pass with a cache."""
    _check_chunk(chunk)
    device = model.lm_head.weight.device
    x = torch.tensor(ids, device=device)[None]                          # (1, L)
    cache = model.new_cache(1, x.shape[1])
    out = []
    for s in range(0, x.shape[1] - 1, chunk):
        logits = model(x[:, s:s + chunk], cache=cache).logits[0]       # (c, V): predicts tokens s+1 .. s+c
        targets = x[0, s + 1:s + 1 + chunk]                              # the last chunk predicts one fewer
        logp = torch.log_softmax(logits[:len(targets)].double(), -1)
        out.append(-logp.gather(-1, targets[:, None])[:, 0])
    return torch.cat(out)


@torch.inference_mode()
def candidate_logprobs(model, context: list[int], candidates: list[list[int]], chunk: int = 2048) -> torch.Tensor:
    """log p(candidate | context) for each candidate (a sum over its tokens), (n,) float64.

    The context is prefilled once, in chunks; its last logits score every candidate's first token. A candidate of
    more tokens continues a copy of the cache (copy.deepcopy: one copy alive at a time, so peak memory is two
    caches), so the long prefill is never repeated. The other choice, a batch of n copies of the context prefilled
    together, costs n prefills; a cache copy costs one memcpy of the KV cache, cheaper at any length."""
    _check_chunk(chunk)
    if not context or not candidates or not all(candidates):
        raise ValueError("candidate_logprobs needs a non-empty context and non-empty candidates.")
    device = model.lm_head.weight.device
    x = torch.tensor(context, device=device)[None]                      # (1, L)
    cache = model.new_cache(1, x.shape[1] + max(len(c) for c in candidates))
    for s in range(0, x.shape[1], chunk):
        last = model(x[:, s:s + chunk], cache=cache, logits_to_keep=1).logits[0, -1]    # (V,)
    first = torch.log_softmax(last.double(), -1)
    scores = []
    for cand in candidates:
        total = first[cand[0]]
        if len(cand) > 1:
            y = torch.tensor(cand, device=device)[None]                  # (1, m)
            logits = model(y[:, :-1], cache=copy.deepcopy(cache)).logits[0]                # (m-1, V)
            total = total + torch.log_softmax(logits.double(), -1).gather(-1, y[0, 1:, None]).sum()
        scores.append(total)
    return torch.stack(scores)


def rank_of_first(scores: torch.Tensor) -> int:
    """How many candidates score strictly above candidates[0] (the gold): 0 = the gold wins."""
    return int((scores[1:] > scores[0]).sum())


def cumulative_mean(nll: torch.Tensor) -> torch.Tensor:
    """C(t) = (1/t) sum_{i<=t} nll_i along the last dimension."""
    t = torch.arange(1, nll.shape[-1] + 1, dtype=nll.dtype, device=nll.device)
    return nll.cumsum(-1) / t


def fit_power_law(t, y) -> tuple[float, float, float]:
    """(a, b, c) minimising sum (a t^-b + c - y)^2 over positions t >= 1.

    For a fixed offset c the fit is linear in log space: log(y - c) = log a - b log t. The offset c lies in
    [0, min y) (an NLL floor is non-negative), often within a hair of min y, so it is searched as the gap
    g = min y - c on a log grid (1e-9 min y .. min y), then refined by golden-section search between the grid
    neighbours of the best point, always on the squared error in the original space; Levenberg-Marquardt on
    all three parameters finishes from there."""
    t = torch.as_tensor(t, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    if t.numel() < 3 or t.numel() != y.numel() or bool((t <= 0).any()) or bool((y <= 0).any()):
        raise ValueError("fit_power_law needs >= 3 points with positive positions and values.")
    logt, y_min = t.log(), float(y.min())
    X = torch.stack([torch.ones_like(logt), -logt], 1)                  # columns: log a, b

    def fit(log_gap: float):
        c = y_min - math.exp(log_gap)
        coef = torch.linalg.lstsq(X, (y - c).log()[:, None]).solution[:, 0]
        a, b = float(coef[0].exp()), float(coef[1])
        return float(((a * t ** -b + c - y) ** 2).sum()), a, b, c
    grid = torch.linspace(math.log(y_min * 1e-9), math.log(y_min), 400).tolist()
    best = min(range(len(grid)), key=lambda i: fit(grid[i])[0])
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(100):
        m1, m2 = hi - golden * (hi - lo), lo + golden * (hi - lo)
        lo, hi = (lo, m2) if fit(m1)[0] <= fit(m2)[0] else (m1, hi)
    _, a, b, c = fit((lo + hi) / 2)
    return _levenberg_marquardt(t, y, a, b, c)


def _levenberg_marquardt(t, y, a: float, b: float, c: float, steps: int = 100) -> tuple[float, float, float]:
    """Refine (a, b, c) on sum r^2, r = a t^-b + c - y, with no constraint on c: noise can put points below the
    floor, where the log-space start cannot reach. Jacobian columns: t^-b, -a t^-b log t, 1."""
    theta, damping = torch.tensor([a, b, c], dtype=torch.float64), 1e-3

    def residual(th):
        return th[0] * t ** -th[1] + th[2] - y
    r = residual(theta)
    for _ in range(steps):
        p = t ** -theta[1]
        J = torch.stack([p, -theta[0] * p * t.log(), torch.ones_like(t)], 1)          # (n, 3)
        JtJ = J.T @ J
        step = torch.linalg.solve(JtJ + damping * torch.diag(JtJ.diagonal()), -J.T @ r)
        r_new = residual(theta + step)
        if float(r_new @ r_new) < float(r @ r):
            theta, r, damping = theta + step, r_new, damping / 3
        else:
            damping *= 4
    return float(theta[0]), float(theta[1]), float(theta[2])


def nll_curve(model, documents: list[list[int]], chunk: int = 2048) -> torch.Tensor:
    """Mean NLL per position over equal-length documents, (L-1,) float64."""
    return torch.stack([token_nll(model, d, chunk) for d in documents]).mean(0)


def _log_positions(n: int) -> list[int]:
    """1, 2, 4, ... and n: the positions the table prints."""
    out = [1 << k for k in range(n.bit_length()) if 1 << k < n]
    return out + [n]


def main(argv) -> None:
    from ..tokenizer import load_tokenizer
    from ..train.data import read_documents
    from . import load_model, parse_length, save_plot
    p = argparse.ArgumentParser(prog="nemotron3 eval nll", description="Cumulative mean NLL vs position on long "
                                "documents, with a power-law fit a*t^-b + c.")
    p.add_argument("--model", help="checkpoint directory")
    p.add_argument("--preset", help="random weights of a built-in architecture (a smoke run)")
    p.add_argument("--data", required=True, help="a .txt / .jsonl file or saved dataset of documents, or 'builtin' "
                   "(held-out long documents of train/long_docs.py: their first --max-len tokens, the prompt)")
    p.add_argument("--field", default="text", help="the text field of a .jsonl file (default text)")
    p.add_argument("--max-len", default="4k", help="tokens per document, e.g. 4096, 16k, 1m (default 4k)")
    p.add_argument("--max-docs", type=int, default=16, help="documents to average over (default 16)")
    p.add_argument("--prefill-chunk", type=int, default=2048, help="tokens per forward (default 2048)")
    p.add_argument("--out", default=None, help="directory for nll.json and nll.png")
    p.add_argument("--seed", type=int, default=0, help="seed for --preset weights and built-in documents")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    p.add_argument("--device", default="auto", help="cuda, cpu, cuda:1, ... (default auto: CUDA if present)")
    args = p.parse_args(argv)
    max_len = parse_length(args.max_len, "--max-len")
    if args.max_docs < 1:
        raise ValueError(f"--max-docs {args.max_docs} must be >= 1.")
    _check_chunk(args.prefill_chunk)
    model = load_model(args)
    tok = load_tokenizer(args.model, model.config.vocab_size)
    if args.data == "builtin":
        from ..train.long_docs import long_documents
        texts = long_documents(tok, max_len, seed=args.seed, split="heldout")
    else:
        texts = read_documents(args.data, args.field)
    docs, seen = [], 0
    for text in texts:
        seen += 1
        ids = tok.encode(text)
        if len(ids) >= max_len:
            docs.append(ids[:max_len])
            if len(docs) == args.max_docs:
                break
    if not docs:
        raise ValueError(f"--data {args.data}: none of its {seen} documents has {max_len} tokens; lower --max-len.")
    nll = nll_curve(model, docs, args.prefill_chunk)
    cum = cumulative_mean(nll)
    a, b, c = fit_power_law(torch.arange(1, len(cum) + 1), cum)
    print(f"{len(docs)} documents of {max_len} tokens ({seen} read); C(t) = {a:.4g} * t^-{b:.4g} + {c:.4g}")
    print(f"{'position':>10} {'NLL':>8} {'cumulative':>11} {'fit':>8}")
    for t in _log_positions(len(cum)):
        print(f"{t:>10} {float(nll[t - 1]):>8.4f} {float(cum[t - 1]):>11.4f} {a * t ** -b + c:>8.4f}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "nll.json"), "w") as f:
            json.dump({"model": args.model or args.preset, "data": args.data, "documents": len(docs),
                       "max_len": max_len, "fit": {"a": a, "b": b, "c": c}, "nll": nll.tolist(),
                       "cumulative": cum.tolist()}, f)
        save_plot(os.path.join(args.out, "nll.png"), lambda plt: _plot_nll(plt, cum, (a, b, c)))
        print(f"wrote {os.path.join(args.out, 'nll.json')} and nll.png")


def _plot_nll(plt, cum, fit):
    a, b, c = fit
    t = torch.arange(1, len(cum) + 1, dtype=torch.float64)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(t, cum, label="cumulative mean NLL")
    ax.plot(t, a * t ** -b + c, "--", label=f"fit {a:.3g} t^-{b:.3g} + {c:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel("nats / token")
    ax.legend()
    return fig
