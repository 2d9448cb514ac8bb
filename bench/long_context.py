"""Long-context prefill and decode on CPU: a prompt of N tokens prefilled chunk by chunk into a HybridCache, then
greedy decoding; wall time, tokens/s, peak RSS and the cache's K/V + Mamba-state bytes per length.

    python bench/long_context.py --lengths 1048576 --presets tiny --decode-tokens 32     # the 1M run (hours)
    python bench/long_context.py                                     # the regular run (tiny + small, 1K ... 256K)
    python bench/long_context.py --decode-only --decode-contexts 1048576    # decode rows at 1M (random K/V)
    python bench/long_context.py --attention-paths 4096,65536,262144     # one chunk's attention, three ways
    python bench/long_context.py --packed-paths 4096,16384               # packed training rows, two ways

The regular run, per preset (tiny, small), all in one process and one run:
- prefill tokens/s and peak RSS vs length, chunked (1K ... 256K);
- the same one-shot forward (no cache) in ours and in transformers' NemotronHForCausalLM on the same weights, at
  the lengths transformers can do here (its masks and its Mamba scan grow with L^2), as ratios;
- chunked prefill == one-shot prefill: max |logits difference| over every position at the lengths one-shot fits;
- decode tokens/s at 4K / 64K / 256K context against an all-attention (NoPE) model with the hybrid's pattern with
  M -> * and the attention width that matches its total parameters (bench/hybrid_vs_transformer.py). Decode time
  does not depend on what the cache holds, so the cache is filled with random K/V (and states) at the context
  length instead of being prefilled (an all-attention 256K prefill alone would take hours here).

Memory is set by the chunk: every chunk after the first attends to the cached prefix without building its
(chunk, context) mask (model/attention.py's prefix_causal_attention), Mamba layers carry their (conv, SSM) state,
and the cache is allocated once for N + decode tokens. Weights are random (the preset's init): time and memory do
not depend on what the weights learnt. Peak RSS is the process's high-water mark (VmHWM), reset before each
measurement after freed heap is returned to the OS (malloc_trim + /proc/self/clear_refs), so it covers the
process's live memory (interpreter, weights of the models loaded) + cache + the chunk's temporaries.
Writes bench/results/long_context[_<tag>].json (and .png for the regular run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, machine, new_figure, print_table, save, save_figure  # noqa: E402
from hybrid_vs_transformer import matched_transformer  # noqa: E402

import torch  # noqa: E402

from nemotron3 import NemotronForCausalLM, count_parameters, from_preset  # noqa: E402


# ---- memory ------------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak_rss() -> bool:
    """Give freed heap back to the OS (glibc malloc_trim), then reset VmHWM to the current RSS (Linux clear_refs 5),
    so the next peak counts live memory only; False where not permitted."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


# ---- one prefill + decode ----------------------------------------------------------------------------------------
def prefill_and_decode(model, n_tokens: int, chunk: int, decode_tokens: int, log=None, seed: int = 0) -> dict:
    """Prefill n_tokens random ids in chunks of `chunk` into a fresh cache, then greedily decode `decode_tokens`.
    log(dict) is called after chunks with the progress so far (elapsed, tokens done, RSS)."""
    V = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(V, (1, n_tokens), generator=gen)
    reset_peak_rss()
    cache = model.new_cache(1, n_tokens + decode_tokens)
    t0 = time.perf_counter()
    last_log = t0
    with torch.inference_mode():
        for s in range(0, n_tokens, chunk):
            out = model(ids[:, s:s + chunk], cache=cache, logits_to_keep=1)
            now = time.perf_counter()
            done = min(s + chunk, n_tokens)
            if log is not None and (now - last_log > 60 or done == n_tokens):
                last_log = now
                log(dict(tokens_done=done, of=n_tokens, elapsed_s=round(now - t0, 1),
                         tok_per_s=round(done / (now - t0), 1), rss_gib=round(rss_bytes() / 2**30, 3),
                         peak_rss_gib=round(peak_rss_bytes() / 2**30, 3)))
        prefill_s = time.perf_counter() - t0
        tokens = []
        nxt = out.logits[:, -1].argmax(-1)
        t1 = time.perf_counter()
        for _ in range(decode_tokens):
            tokens.append(int(nxt))
            out = model(nxt[:, None], cache=cache)
            nxt = out.logits[:, -1].argmax(-1)
        decode_s = time.perf_counter() - t1
    kv = sum(t.numel() * t.element_size() for pair in cache.kv.values() for t in pair)
    state = cache.nbytes() - kv
    return dict(tokens=n_tokens, chunk=chunk, prefill_s=round(prefill_s, 2), prefill_tok_s=n_tokens / prefill_s,
                decode_tokens=decode_tokens, decode_s=round(decode_s, 3),
                decode_tok_s=decode_tokens / decode_s if decode_tokens else None,
                peak_rss_gib=round(peak_rss_bytes() / 2**30, 3), kv_bytes=kv, mamba_state_bytes=state,
                cache_gib=round(cache.nbytes() / 2**30, 3), first_decoded=tokens[:8])


def build(preset: str, seed: int = 0, **overrides) -> NemotronForCausalLM:
    torch.manual_seed(seed)
    return NemotronForCausalLM(from_preset(preset, **overrides)).eval()


# ---- the regular run ---------------------------------------------------------------------------------------------
def one_shot(model, ids) -> dict:
    """One cache-less forward of ids (1, L) (last position's logits only, as a prefill): seconds and peak RSS."""
    reset_peak_rss()
    t0 = time.perf_counter()
    with torch.inference_mode():
        model(ids, logits_to_keep=1) if isinstance(model, NemotronForCausalLM) else model(ids, logits_to_keep=1,
                                                                                            use_cache=False)
    s = time.perf_counter() - t0
    return dict(seconds=round(s, 3), tok_s=ids.shape[1] / s, peak_rss_gib=round(peak_rss_bytes() / 2**30, 3))


def chunked_equals_one_shot(model, n: int, chunk: int) -> float:
    """max |logits(chunked prefill) - logits(one-shot forward)| over all n positions (hidden states kept, the LM
    head applied in slices so the (n, V) logits are never held at once)."""
    ids = torch.randint(model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = model.backbone(ids)
        cache = model.new_cache(1, n)
        parts = [model(ids[:, s:s + chunk], cache=cache, logits_to_keep=1).hidden_states for s in range(0, n, chunk)]
        chunked = torch.cat(parts, 1)
        return max(float((model.lm_head(full[:, a:a + 1024]) - model.lm_head(chunked[:, a:a + 1024])).abs().max())
                   for a in range(0, n, 1024))


def decode_rate_at(model, context: int, steps: int, repeats: int = 3) -> float:
    """Greedy decode tokens/s with `context` tokens already in the cache (random K/V and states: the time of a step
    depends only on how many keys it reads)."""
    cache = model.new_cache(1, context + steps + 1)
    g = torch.Generator().manual_seed(0)
    for t in (*[x for kv in cache.kv.values() for x in kv], *cache.conv.values(), *cache.ssm.values()):
        t.copy_(torch.randn(t.shape, generator=g) * 0.5)
    cache.pos.fill_(context)
    tok = torch.zeros(1, 1, dtype=torch.long)
    best = 0.0
    with torch.inference_mode():
        model(tok, cache=cache)                                                            # warm-up step
        for _ in range(repeats):                         # best of `repeats` runs: the shared cores are noisy
            cache.pos.fill_(context)
            t0 = time.perf_counter()
            for _ in range(steps):
                tok = model(tok, cache=cache).logits[:, -1:].argmax(-1)
            best = max(best, steps / (time.perf_counter() - t0))
    return best


def load_hf(ours):
    """transformers' NemotronHForCausalLM with our weights (saved and loaded through the checkpoint format)."""
    import tempfile

    from model_speed import load_hf as load
    tmp = tempfile.mkdtemp()
    ours.save_pretrained(tmp)
    return load(tmp)


def regular_run(args) -> None:
    result = dict(config=vars(args), prefill=[], hf=[], equality=[], decode=[], params={})
    path = os.path.join(RESULTS, "long_context.json")

    def dump():
        save("long_context", result)
    for preset in args.presets:
        hybrid = build(preset, max_position_embeddings=2**21)
        result["params"][preset] = count_parameters(hybrid.config)["total"]
        # ours vs transformers, one-shot forward on the same weights
        hf = load_hf(hybrid)
        warm = torch.randint(hybrid.config.vocab_size, (1, 256))
        one_shot(hybrid, warm), one_shot(hf, warm)
        for n in args.hf_lengths:
            ids = torch.randint(hybrid.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
            row = dict(preset=preset, tokens=n, ours=one_shot(hybrid, ids))
            try:
                row["transformers"] = one_shot(hf, ids)
                row["ratio"] = row["transformers"]["seconds"] / row["ours"]["seconds"]
            except (RuntimeError, MemoryError) as e:           # transformers' L^2 masks / scan out of memory
                row["transformers"] = dict(error=str(e)[:200])
            result["hf"].append(row)
            print(json.dumps(row), flush=True)
            dump()
        del hf
        for n in args.equal_lengths:
            result["equality"].append(dict(preset=preset, tokens=n, chunk=args.chunk,
                                           max_abs_logit_diff=chunked_equals_one_shot(hybrid, n, args.chunk)))
            print(json.dumps(result["equality"][-1]), flush=True)
            dump()
        # decode vs context, hybrid vs matched all-attention
        attn_cfg = matched_transformer(hybrid.config)
        torch.manual_seed(0)
        all_attention = NemotronForCausalLM(attn_cfg).eval()
        result["params"][preset + "_all_attention"] = count_parameters(attn_cfg)["total"]
        for T in args.decode_contexts:
            row = dict(preset=preset, context=T, hybrid_tok_s=decode_rate_at(hybrid, T, args.decode_steps),
                       all_attention_tok_s=decode_rate_at(all_attention, T, args.decode_steps),
                       all_attention_pattern=attn_cfg.hybrid_override_pattern)
            row["ratio"] = row["hybrid_tok_s"] / row["all_attention_tok_s"]
            result["decode"].append(row)
            print(json.dumps(row), flush=True)
            dump()
        del all_attention
        # chunked prefill vs length (longest last: partial results are saved as they come)
        for n in args.prefill_lengths:
            row = dict(preset=preset) | prefill_and_decode(hybrid, n, args.chunk, 0)
            result["prefill"].append(row)
            print(json.dumps(row), flush=True)
            dump()
    print_table(result["prefill"], ["preset", "tokens", "prefill_s", "prefill_tok_s", "peak_rss_gib", "kv_bytes",
                                    "mamba_state_bytes"])
    print_table([dict(preset=r["preset"], tokens=r["tokens"], ours_s=r["ours"]["seconds"],
                      ours_gib=r["ours"]["peak_rss_gib"], hf_s=r["transformers"].get("seconds"),
                      hf_gib=r["transformers"].get("peak_rss_gib"), ratio=r.get("ratio")) for r in result["hf"]],
                ["preset", "tokens", "ours_s", "ours_gib", "hf_s", "hf_gib", "ratio"])
    print_table(result["equality"], ["preset", "tokens", "chunk", "max_abs_logit_diff"])
    print_table(result["decode"], ["preset", "context", "hybrid_tok_s", "all_attention_tok_s", "ratio"])
    plot(result)
    print("wrote", path)


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def kv_bytes(config, context: int) -> int:
    """fp32 K + V bytes of a batch-1 cache holding `context` tokens: 2 x attention layers x nKV x head_dim x 4."""
    n_attn = config.layers_block_type.count("full_attention")
    return 2 * n_attn * config.num_key_value_heads * config.head_dim * 4 * context


def decode_rows(args) -> None:
    """Only the decode-vs-context rows (hybrid vs matched all-attention) at --decode-contexts, merged into
    long_context.json (replacing rows of the same preset and context), then the plot redrawn: the 1M rows."""
    path = os.path.join(RESULTS, "long_context.json")
    with open(path) as f:
        result = json.load(f)
    for preset in args.presets:
        hybrid = build(preset, max_position_embeddings=2**21)
        attn_cfg = matched_transformer(hybrid.config)
        torch.manual_seed(0)
        all_attention = NemotronForCausalLM(attn_cfg).eval()
        for T in args.decode_contexts:
            row = dict(preset=preset, context=T, hybrid_tok_s=decode_rate_at(hybrid, T, args.decode_steps),
                       all_attention_pattern=attn_cfg.hybrid_override_pattern)
            need, avail = kv_bytes(attn_cfg, T), _mem_available()
            if need < 0.6 * avail:
                row["all_attention_tok_s"] = decode_rate_at(all_attention, T, args.decode_steps)
                row["ratio"] = row["hybrid_tok_s"] / row["all_attention_tok_s"]
            else:                    # its K/V alone would not fit: the row says so instead of being OOM-killed
                row["all_attention_tok_s"] = row["ratio"] = None
                row["all_attention_note"] = f"K/V of {need / 2**30:.1f} GiB does not fit ({avail / 2**30:.1f} GiB free)"
            result["decode"] = [r for r in result["decode"] if (r["preset"], r["context"]) != (preset, T)] + [row]
            result["decode"].sort(key=lambda r: (r["preset"], r["context"]))
            save("long_context", result)
            print(json.dumps(row), flush=True)
        del all_attention
    print_table(result["decode"], ["preset", "context", "hybrid_tok_s", "all_attention_tok_s", "ratio"])
    plot(result)


def _huge_rows(preset: str) -> list[dict]:
    """Rows of the separate 1M-token run (long_context_1048576.json), when it has been run."""
    path = os.path.join(RESULTS, "long_context_1048576.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in json.load(f)["runs"] if r["preset"] == preset]


def plot(result) -> None:
    fig, (a, b, c) = new_figure(3, (16, 4.5))
    for i, preset in enumerate(dict.fromkeys(r["preset"] for r in result["prefill"])):
        rows = [r for r in result["prefill"] if r["preset"] == preset] + _huge_rows(preset)
        a.plot([r["tokens"] for r in rows], [r["prefill_tok_s"] for r in rows], "o-", color=f"C{i}",
               label=f"{preset} chunked")
        b.plot([r["tokens"] for r in rows], [r["peak_rss_gib"] for r in rows], "o-", color=f"C{i}", label=preset)
        hf = [r for r in result["hf"] if r["preset"] == preset and "seconds" in r["transformers"]]
        if hf:
            a.plot([r["tokens"] for r in hf], [r["transformers"]["tok_s"] for r in hf], "x--", color=f"C{i}",
                   label=f"{preset} transformers one-shot")
            b.plot([r["tokens"] for r in hf], [r["transformers"]["peak_rss_gib"] for r in hf], "x--",
                   color=f"C{i}", label=f"{preset} transformers")
        dec = [r for r in result["decode"] if r["preset"] == preset]
        c.plot([r["context"] for r in dec], [r["hybrid_tok_s"] for r in dec], "o-", color=f"C{i}",
               label=f"{preset} hybrid")
        fits = [r for r in dec if r["all_attention_tok_s"]]
        c.plot([r["context"] for r in fits], [r["all_attention_tok_s"] for r in fits], "s:", color=f"C{i}",
               label=f"{preset} all-attention")
    for ax, title, ylabel in ((a, "prefill speed", "tokens / s"), (b, "peak memory (RSS)", "GiB"),
                              (c, "decode speed vs context", "tokens / s")):
        ax.set_xscale("log", base=2)
        if ax is not b:
            ax.set_yscale("log")
        ax.set(xlabel="tokens", ylabel=ylabel, title=title)
        ax.legend(fontsize=7)
    save_figure(fig, "long_context")


def attention_paths(contexts: list[int], chunk: int = 512) -> None:
    """One prefill chunk's attention over a long cache, three ways, same inputs (tiny's shape: 4 query heads, 2 KV
    heads, head dim 16): the explicit (chunk, context) boolean mask (the path before), prefix + chunk merged by
    log-sum-exp (model/attention.py, the path now), and flex_attention under a block mask (torch.compile'd; its
    compile time is reported apart). Writes bench/results/long_context_attention.json."""
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from common import best_time
    from nemotron3.model.attention import cached_attention_mask, prefix_causal_attention
    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    for T in contexts:
        prefix = T - chunk
        g = torch.Generator().manual_seed(T)
        q, k, v = torch.randn(1, 4, chunk, 16, generator=g), torch.randn(1, 2, T, 16, generator=g), \
            torch.randn(1, 2, T, 16, generator=g)
        mask = cached_attention_mask(torch.tensor([prefix]), chunk, T, None)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        block = create_block_mask(lambda b, h, i, j: j <= i + prefix, 1, 1, chunk, T, device="cpu")
        t0 = time.perf_counter()
        out_flex = flex(q, k, v, block_mask=block, enable_gqa=True)
        compile_s = time.perf_counter() - t0
        row = dict(context=T, chunk=chunk,
                   mask_s=best_time(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
                                    repeats=2),
                   lse_merge_s=best_time(lambda: prefix_causal_attention(q, k, v, prefix), repeats=2),
                   flex_s=best_time(lambda: flex(q, k, v, block_mask=block, enable_gqa=True), repeats=2),
                   flex_first_call_s=compile_s,
                   lse_merge_max_err=float((prefix_causal_attention(q, k, v, prefix) - ref).abs().max()),
                   flex_max_err=float((out_flex - ref).abs().max()), mask_bytes=mask.numel())
        rows.append(row)
        print(json.dumps(row), flush=True)
    save("long_context_attention", dict(rows=rows))
    print_table(rows, ["context", "mask_s", "lse_merge_s", "flex_s", "flex_first_call_s", "lse_merge_max_err",
                       "flex_max_err", "mask_bytes"])


def packed_paths(lengths: list[int], doc_len: int = 512, rows: int = 2) -> None:
    """Packed training rows (documents of doc_len tokens, position_ids restarting), attention forward + backward two
    ways: SDPA under the block-diagonal (L, L) mask (the path before) and one causal SDPA per document
    (model/attention.py's packed_causal_attention). Writes bench/results/long_context_packed.json."""
    import torch.nn.functional as F

    from nemotron3.model.attention import packed_causal_attention
    out = []
    for L in lengths:
        seq_idx = (torch.arange(L) // doc_len).expand(rows, L)
        g = torch.Generator().manual_seed(L)
        q, k, v = (torch.randn(rows, h, L, 16, generator=g).requires_grad_() for h in (4, 2, 2))

        def dense():
            keep = torch.ones(L, L, dtype=torch.bool).tril()[None] & (seq_idx[:, :, None] == seq_idx[:, None, :])
            F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None], enable_gqa=True).sum().backward()
        from common import best_time
        row = dict(tokens=L, doc_len=doc_len, rows=rows, mask_fwd_bwd_s=best_time(dense, repeats=2),
                   per_document_fwd_bwd_s=best_time(lambda: packed_causal_attention(q, k, v, seq_idx).sum()
                                                    .backward(), repeats=2))
        out.append(row)
        print(json.dumps(row), flush=True)
    save("long_context_packed", dict(rows=out))


def huge_run(args) -> None:
    """One prefill + decode per (preset, length), logged as it goes: the 1M-token run."""
    tag = args.tag or "_".join(str(n) for n in args.lengths)
    path = os.path.join(RESULTS, f"long_context_{tag}.json")
    os.makedirs(RESULTS, exist_ok=True)
    runs = []
    for preset in args.presets:
        model = build(preset)
        for n in args.lengths:
            def log(p, preset=preset):
                print(json.dumps(dict(preset=preset) | p), flush=True)
            print(f"# {preset}: prefill {n:,} tokens in chunks of {args.chunk}, then {args.decode_tokens} decoded",
                  flush=True)
            r = dict(preset=preset) | prefill_and_decode(model, n, args.chunk, args.decode_tokens, log)
            runs.append(r)
            print(json.dumps(r), flush=True)
            with open(path, "w") as f:
                json.dump(dict(runs=runs, machine=machine()), f, indent=2)
    print_table(runs, ["preset", "tokens", "prefill_s", "prefill_tok_s", "decode_tok_s", "peak_rss_gib",
                       "kv_bytes", "mamba_state_bytes"])
    print("wrote", path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="comma-separated prompt lengths: a prefill + decode per length, logged as it goes")
    ap.add_argument("--presets", type=lambda s: s.split(","), default=["tiny", "small"])
    ap.add_argument("--chunk", type=int, default=2048, help="prefill chunk length (tokens per forward)")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--tag", default=None, help="results file suffix (default: the lengths)")
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    ap.add_argument("--prefill-lengths", type=ints, default=[1024, 4096, 16384, 65536, 262144])
    ap.add_argument("--hf-lengths", type=ints, default=[1024, 4096, 16384],
                    help="one-shot lengths for the transformers comparison")
    ap.add_argument("--equal-lengths", type=ints, default=[4096, 16384])
    ap.add_argument("--decode-contexts", type=ints, default=[4096, 65536, 262144])
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--decode-only", action="store_true",
                    help="only the decode rows at --decode-contexts, merged into long_context.json (e.g. 1048576)")
    ap.add_argument("--replot", action="store_true", help="redraw long_context.png from long_context.json")
    ap.add_argument("--packed-paths", type=ints, default=None,
                    help="only time packed-row attention (block-diagonal mask / per document) at these row lengths")
    ap.add_argument("--attention-paths", type=ints, default=None,
                    help="only time one chunk's attention (mask / log-sum-exp merge / flex) at these contexts")
    args = ap.parse_args(argv)
    if args.chunk < 1 or args.decode_tokens < 0:
        raise SystemExit("--chunk must be >= 1 and --decode-tokens >= 0.")
    if args.replot:
        with open(os.path.join(RESULTS, "long_context.json")) as f:
            return plot(json.load(f))
    if args.decode_only:
        return decode_rows(args)
    if args.packed_paths:
        return packed_paths(args.packed_paths)
    if args.attention_paths:
        return attention_paths(args.attention_paths)
    if args.lengths is not None:
        return huge_run(args)
    regular_run(args)


if __name__ == "__main__":
    main()
