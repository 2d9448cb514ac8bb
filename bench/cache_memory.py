"""Generation-cache bytes vs context length: the hybrid (Mamba state constant in length, KV only in the few
attention layers) against a pure-attention model of the same depth and width (every Mamba layer made attention).

    python bench/cache_memory.py                       # seconds: caches are allocated on the meta device
    python bench/cache_memory.py --preset super-120b-a12b

The bytes are those of the HybridCache the engine allocates (model dtype for KV and conv windows, fp32 SSM state),
counted without allocating (meta tensors); a real allocation of the tiny preset checks the count.
Writes bench/results/cache_memory.json and .png.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import new_figure, print_table, save, save_figure  # noqa: E402

import torch  # noqa: E402

from nemotron3 import from_preset  # noqa: E402
from nemotron3.model.cache import HybridCache  # noqa: E402


def cache_bytes(config, length: int, batch: int = 1, dtype=torch.bfloat16, device="meta") -> int:
    return HybridCache(config, batch, length, device=device, dtype=dtype).nbytes()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="nano-30b-a3b")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536, 262144, 1048576])
    args = p.parse_args()
    hybrid = from_preset(args.preset)
    pattern = "".join("*" if c == "M" else c for c in hybrid.hybrid_override_pattern)
    attention_only = from_preset(args.preset, layers_block_type=pattern)
    tiny = from_preset("tiny")                                   # the count equals a real allocation
    assert cache_bytes(tiny, 300, 2, torch.float32) == cache_bytes(tiny, 300, 2, torch.float32, "cpu")
    rows = []
    for n in args.lengths:
        h, a = cache_bytes(hybrid, n), cache_bytes(attention_only, n)
        rows.append(dict(context=n, hybrid_MiB=h / 2**20, attention_only_MiB=a / 2**20, ratio=a / h))
    print(f"{args.preset}: {hybrid.hybrid_override_pattern}  vs  {pattern}  (bf16 KV / conv, fp32 SSM state, batch 1)")
    print_table(rows, ["context", "hybrid_MiB", "attention_only_MiB", "ratio"])
    mamba_state = cache_bytes(hybrid, 1) - cache_bytes(from_preset(args.preset, layers_block_type="".join(
        c for c in hybrid.hybrid_override_pattern if c != "M")), 1)
    path = save("cache_memory", dict(preset=args.preset, hybrid_pattern=hybrid.hybrid_override_pattern,
                                     attention_pattern=pattern, constant_mamba_state_bytes=mamba_state, rows=rows))
    fig, ax = new_figure(1, (7, 4.5))
    ax.loglog([r["context"] for r in rows], [r["hybrid_MiB"] for r in rows], "o-", label=f"hybrid ({args.preset})")
    ax.loglog([r["context"] for r in rows], [r["attention_only_MiB"] for r in rows], "s-",
              label="same model, every Mamba layer as attention")
    ax.set(xlabel="context length (tokens)", ylabel="cache per sequence (MiB)",
           title="generation cache vs context length (bf16 KV)")
    ax.legend()
    save_figure(fig, "cache_memory")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
