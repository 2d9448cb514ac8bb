"""Fused linear cross-entropy: time and memory of the ways to compute the LM-head loss of a training step, for the
main head plus D MTP depths sharing one (V, d) head, as the model does (1 + D head calls, then one backward).

    python bench/fused_ce_memory.py                      # ~1 min on 2 cores
    python bench/fused_ce_memory.py --V 131072 --d 2688 --n 4096 --device cuda    # Nano's head, on a GPU

Variants:
    recompute         the library (model/loss.py): forward keeps the per-token logsumexp; backward recomputes each
                      chunk's logits and makes dh and dW (4 (n, V, d) matmuls per call)
    grad_in_forward   the alternative it replaced (Liger's shape): forward makes dh and dW right away and saves them
                      for backward to scale (3 matmuls per call, but a float32 (V, d) dW held per call)
    logits            materialised logits + F.cross_entropy (the unfused baseline: (n, V) per call)
Measured per variant in a fresh process: the bytes autograd holds between forward and backward beyond the inputs
(saved-tensor hooks), the peak memory of the first step above what the inputs take (CUDA: max_memory_allocated;
CPU: the process's peak resident set, which includes the (V, d) weight gradient itself), then the wall time of
forward + backward (best of 3). Writes
bench/results/fused_ce_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, save  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from nemotron3.model.loss import fused_linear_cross_entropy  # noqa: E402


class GradInForward(torch.autograd.Function):
    """The measured alternative: gradients made in forward, (grad_h, grad_w) saved, scaled in backward."""

    @staticmethod
    def forward(ctx, h, weight, labels, chunk_rows):
        loss = h.new_zeros(())
        grad_h, grad_w = torch.empty_like(h), torch.zeros_like(weight)
        rows = torch.arange(min(chunk_rows, h.shape[0]), device=h.device)
        for s in range(0, h.shape[0], chunk_rows):
            h_c, y_c = h[s:s + chunk_rows], labels[s:s + chunk_rows]
            logits = h_c @ weight.T
            lse = torch.logsumexp(logits, -1)
            loss += (lse - logits.gather(1, y_c[:, None]).squeeze(1)).sum()
            G = logits.sub_(lse[:, None]).exp_()
            G[rows[:G.shape[0]], y_c] -= 1.0
            grad_h[s:s + chunk_rows] = G @ weight
            grad_w.addmm_(G.T, h_c)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, g):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * g, grad_w * g, None, None


def head_losses(variant, hs, W, ys):
    if variant == "recompute":
        return sum(fused_linear_cross_entropy(h, W, y, reduction="sum")[0] for h, y in zip(hs, ys))
    if variant == "grad_in_forward":
        return sum(GradInForward.apply(h, W, y, 256) for h, y in zip(hs, ys))
    return sum(F.cross_entropy(h @ W.T, y, reduction="sum") for h, y in zip(hs, ys))


def measure(args) -> dict:
    """One variant, in this process."""
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    Ws = torch.randn(64, args.d, generator=g).to(dev).requires_grad_()       # warm-up: kernels and thread pools load
    head_losses(args.variant, [torch.randn(64, args.d, device=dev, requires_grad=True)], Ws,
                [torch.randint(0, 64, (64,), device=dev)]).backward()
    W = (torch.randn(args.V, args.d, generator=g) * 0.02).to(dev).requires_grad_()
    hs = [torch.randn(args.n, args.d, generator=g).to(dev).requires_grad_() for _ in range(1 + args.depths)]
    ys = [torch.randint(0, args.V, (args.n,), generator=g).to(dev) for _ in hs]
    inputs = {t.untyped_storage().data_ptr() for t in [W, *hs]}
    held = []

    def pack(t):                        # bytes kept for backward that are not the inputs themselves
        if t.untyped_storage().data_ptr() not in inputs:
            held.append(t.untyped_storage().nbytes())
        return t

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step():
        for t in [W, *hs]:
            t.grad = None
        head_losses(args.variant, hs, W, ys).backward()
        sync()

    # memory first, on the process's first full-size step (after a small warm-up): CPU peak RSS only rises, and
    # tensors this large are mmap'ed and returned on free, so the resident set tracks the live tensors
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = head_losses(args.variant, hs, W, ys)
    saved = sum(held)
    loss.backward()
    sync()
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda" else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base
    del loss
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return dict(variant=args.variant, seconds=min(times), saved_mb=saved / 2**20, peak_mb=peak / 2**20,
                dW_mb=args.V * args.d * 4 / 2**20)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--V", type=int, default=16384)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--n", type=int, default=1024, help="tokens per head call")
    p.add_argument("--depths", type=int, default=2, help="MTP depths (head calls = 1 + depths)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)          # internal: one variant, then exit
    args = p.parse_args()
    if args.variant:
        print(json.dumps(measure(args)))
        return
    rows = []
    for variant in ("recompute", "grad_in_forward", "logits"):
        cmd = [sys.executable, __file__, "--variant", variant] + [f"--{k}={getattr(args, k)}" for k in
                                                                 ("V", "d", "n", "depths", "device")]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
        print(rows[-1], flush=True)
    print_table(rows, ["variant", "seconds", "saved_mb", "peak_mb", "dW_mb"])
    print(f"wrote {save('fused_ce_memory', dict(config=vars(args), rows=rows))}")


if __name__ == "__main__":
    main()
