"""CUDA checks of packed sequences and of the linear-time Mamba-2 scan, which the CPU suite cannot make.

    python bench/cuda_packing_check.py     # needs a CUDA device; ~1 min; writes bench/results/cuda_packing_check.json

1. A packed row (position_ids restarting at 0) on CUDA equals each sequence run alone (fp32 logits, MTP logits,
   summed losses, gradients), for the tiny config with every layer kind, LatentMoE and MTP.
2. ssd_chunked at long lengths: time and peak memory of forward + backward grow linearly with the length (the
   chunk-to-chunk state passing holds no (c+1, c+1) decay matrix), with packed-sequence resets on.
3. A few training steps on CUDA (bf16) with --no-cross-document run and lower the loss.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import save  # noqa: E402

import torch  # noqa: E402

from nemotron3 import NemotronForCausalLM, from_preset  # noqa: E402
from nemotron3.model.mamba2 import ssd_chunked  # noqa: E402


def check(name, ok, detail=""):
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)
    return dict(name=name, ok=bool(ok), detail=detail)


def packed_equals_alone(dev):
    torch.manual_seed(0)
    model = NemotronForCausalLM(from_preset("tiny", chunk_size=4)).to(dev)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:                       # weights far from init scale, so a 1e-4 gap means something
                p.normal_(0, 0.1)
    lengths = [5, 11, 1, 7, 40]
    seqs = [torch.randint(0, 256, (1, n), device=dev) for n in lengths]
    ids, pos = torch.cat(seqs, 1), torch.cat([torch.arange(n, device=dev) for n in lengths])[None]
    packed = model(ids, position_ids=pos, labels=ids, mtp_depths=2, logits_to_keep=ids.shape[1], loss_reduction="sum")
    (packed.loss + sum(packed.mtp_losses)).backward()
    g_packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    worst, total, start = 0.0, 0.0, 0
    for s, n in zip(seqs, lengths):
        alone = model(s, labels=s, mtp_depths=2, logits_to_keep=n, loss_reduction="sum")
        worst = max(worst, float((packed.logits[:, start:start + n] - alone.logits).detach().abs().max()))
        total = total + alone.loss + sum(alone.mtp_losses)
        start += n
    total.backward()
    loss_gap = float((packed.loss + sum(packed.mtp_losses) - total).detach().abs())
    grad_gap = max(float((g_packed[n] - p.grad).abs().max()) for n, p in model.named_parameters() if p.grad is not None)
    return [check("packed row == each sequence alone on CUDA (fp32 logits)", worst < 1e-4, f"max diff {worst:.1e}"),
            check("... summed main + MTP losses", loss_gap < 1e-3, f"diff {loss_gap:.1e}"),
            check("... gradients", grad_gap < 1e-4, f"max diff {grad_gap:.1e}")]


def long_scan(dev):
    rows, res = [], []
    H, P, G, N, Q = 8, 64, 1, 128, 128
    for L in (2 ** 16, 2 ** 18, 2 ** 20):
        x = torch.randn(1, L, H, P, device=dev, requires_grad=True)
        dt = torch.rand(1, L, H, device=dev).mul(0.1).requires_grad_()
        A = -torch.rand(H, device=dev)
        B, C = (torch.randn(1, L, G, N, device=dev, requires_grad=True) for _ in range(2))
        seq = (torch.arange(L, device=dev) // 4096)[None]                       # packed: a new sequence every 4096
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        y, _ = ssd_chunked(x, dt, A, B, C, Q, seq_idx=seq)
        y.square().mean().backward()
        torch.cuda.synchronize()
        rows.append(dict(L=L, seconds=time.perf_counter() - t0,
                         peak_gib=(torch.cuda.max_memory_allocated() - base) / 2 ** 30))
        print(rows[-1], flush=True)
        del x, dt, B, C, y
    per_token = [r["peak_gib"] / r["L"] for r in rows]
    res.append(check("ssd_chunked peak memory per token stays flat from 64K to 1M tokens",
                     per_token[-1] < 1.3 * per_token[0], json.dumps(rows)))
    return res, rows


def train_no_cross_document():
    from nemotron3.train.pretrain import TrainConfig, train
    with tempfile.TemporaryDirectory() as d:
        cfg = TrainConfig(preset="tiny", out=d, precision="bf16", max_steps=30, save_every=30, eval_every=30,
                          seq_len=128, batch_size=8, train_tokens=60_000, device="cuda", no_cross_document=True)
        train(cfg, log=lambda *_: None)
        rows = [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))]
    return [check("train 30 steps on CUDA, bf16, --no-cross-document", rows[-1]["eval_loss"] < 0.8 * rows[0]["loss"],
                  f"loss {rows[0]['loss']:.3f} -> held-out {rows[-1]['eval_loss']:.3f}")]


def main():
    assert torch.cuda.is_available(), "no CUDA device"
    dev = torch.device("cuda")
    res = packed_equals_alone(dev)
    scan_res, scan_rows = long_scan(dev)
    res += scan_res + train_no_cross_document()
    payload = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, checks=res, long_scan=scan_rows)
    print(f"wrote {save('cuda_packing_check', payload)}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "cuda_packing_check.json"), "w") as f:
            json.dump(payload, f, indent=2)
    sys.exit(0 if all(r["ok"] for r in res) else 1)


if __name__ == "__main__":
    main()
