"""Shared benchmark helpers: timing (best of N within one run), the results table, JSON + PNG output."""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def best_time(fn, repeats: int = 3, warmup: int = 1) -> float:
    """Best wall time of `repeats` calls after `warmup` calls: machines here are noisy, the minimum is stable."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def memory_bandwidth_gbs(mb: int = 256) -> float:
    """Measured copy bandwidth (read + write bytes / s) of a buffer much larger than the caches."""
    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    t = best_time(lambda: dst.copy_(src), repeats=5)
    return 2 * src.numel() * 4 / t / 1e9


def machine() -> dict:
    return dict(python=sys.version.split()[0], torch=torch.__version__, threads=torch.get_num_threads(),
                cpu=platform.processor() or platform.machine(), command=" ".join(sys.argv))


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return "" if v is None else str(v)


def save(name: str, payload: dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as f:
        json.dump(payload | {"machine": machine()}, f, indent=2)
    return path


def new_figure(ncols: int = 1, size=(7, 4.5)):
    """(fig, axes) of a headless matplotlib figure with ncols panels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(1, ncols, figsize=size)


def save_figure(fig, name: str) -> str:
    """Write bench/results/<name>.png and return its path."""
    path = os.path.join(RESULTS, f"{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
