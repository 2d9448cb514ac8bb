"""Long-context prefill and decode on CPU: a prompt of N tokens prefilled chunk by chunk into a HybridCache, then
greedy decoding; wall time, tokens/s, peak RSS and the cache's K/V + Mamba-state bytes per length.

    python bench/long_context.py --lengths 1048576 --presets tiny --decode-tokens 32     # the 1M run (hours)
    python bench/long_context.py                                                          # the regular run

Memory is set by the chunk: every chunk after the first attends to the cached prefix without building its
(chunk, context) mask (model/attention.py's prefix_causal_attention), Mamba layers carry their (conv, SSM) state,
and the cache is allocated once for N + decode tokens. Weights are random (the preset's init): time and memory do
not depend on what the weights learnt. Peak RSS is the process's high-water mark (VmHWM), reset before each length
where the kernel allows it (/proc/self/clear_refs), so it covers weights + cache + the chunk's temporaries.
Writes bench/results/long_context[_<tag>].json (and .png for the regular run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, machine, print_table, save  # noqa: E402

import torch  # noqa: E402

from nemotron3 import NemotronForCausalLM, from_preset  # noqa: E402


# ---- memory ------------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs 5); False where not permitted."""
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
    ap.add_argument("--presets", type=lambda s: s.split(","), default=["tiny"])
    ap.add_argument("--chunk", type=int, default=2048, help="prefill chunk length (tokens per forward)")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--tag", default=None, help="results file suffix (default: the lengths)")
    args = ap.parse_args(argv)
    if args.chunk < 1 or args.decode_tokens < 0:
        raise SystemExit("--chunk must be >= 1 and --decode-tokens >= 0.")
    if args.lengths is not None:
        return huge_run(args)
    raise SystemExit("the regular run is not written yet")


if __name__ == "__main__":
    main()
