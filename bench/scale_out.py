"""Scale-out on CPU (gloo): training tokens/s and peak memory per rank against world size and (dp, ep) layout, and
the all-to-all traffic of expert parallelism per token for a standard MoE against LatentMoE (counted: rows that
left each rank in dispatch and combine, times their width and element size).

    python bench/scale_out.py                  # ~2-3 min on 2 cores: 5 torchrun launches of the `small` preset
    python bench/scale_out.py --steps 6 --seq-len 512

Each layout is its own torchrun launch (peak resident memory is per process). LatentMoE is the `small` preset with
moe_latent_size = d/4 and otherwise the same experts (E, K, m): each routed token then travels in width l = d/4
instead of d, so the bytes per token should drop 4x (Nemotron 3 white paper §2.2); expected per MoE layer with
ep = 2: 2 (dispatch + combine) * K * L * 4 B * (ep - 1) / ep. Every rank runs one thread, so one process uses one
of the 2 cores and 4 ranks oversubscribe them: the tokens/s column mixes the scaling with the core count.
Measured (2 shared cores, small preset, 2 x 256 tokens per rank): 307 / 341 / 387 / 548 tokens/s at dp1xep1,
dp2xep1, dp1xep2, dp2xep2 (+-10% between runs); peak 321 / 278 / 284 / 252 MiB per rank; 4,138 bytes per token per MoE layer for MoE
against 1,015 for LatentMoE (4.08x = d/l; expected 4,096 and 1,024).
Context parallelism (--cp-only runs just these rows, ~2 min): one row of 4096 tokens per data-parallel rank, split
over the cp ranks. Measured (2 shared cores, a background benchmark on them too, so ratios only): 448 / 847 / 684
tokens/s at dp1xcp1, dp2xcp1, dp1xcp2 (cp 2: 1.53x one rank); peak 1,144 / 1,100 / 615 MiB per rank (cp 2: 0.54x,
the saved activations halve; FSDP2 sharding alone, dp 2, barely moves it at this length).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]       # (dp, ep); world = dp * ep
CP_LAYOUTS = [(1, 1), (2, 1), (1, 2)]            # (dp, cp) for the long rows; world = dp * cp


def resident_bytes(field: str) -> int:
    """Resident memory now (VmRSS) or at the process's peak (VmHWM); ru_maxrss would include the forking parent's."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def worker(spec: dict) -> None:
    """Under torchrun: train spec["steps"] steps; rank 0 writes tokens/s, peak memory per rank and traffic."""
    import torch
    import torch.distributed as dist

    from nemotron3.config import from_preset
    from nemotron3.train.data import ResumableSampler
    from nemotron3.train.lm_loss import LMLoss
    from nemotron3.train.pretrain import TrainConfig, WindowBatches, build_data
    from nemotron3.train.trainer import Trainer, build_model, distributed

    rank, world = distributed()
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])         # library imports, before the baseline
    before = resident_bytes("VmRSS")
    cp = spec.get("cp", 1)
    cfg = TrainConfig(preset="small", seq_len=spec["seq_len"], batch_size=spec["batch_size"], ep=spec["ep"], cp=cp,
                      train_tokens=spec["steps"] * spec["batch_size"] * world * (spec["seq_len"] + 1) + 5000,
                      out=spec["out"], max_steps=spec["steps"])
    model_config = from_preset("small", moe_latent_size=spec["latent"] or None)
    model, tokenizer = build_model(cfg, model_config)
    train_w, _ = build_data(cfg, tokenizer)
    batches = WindowBatches(train_w, ResumableSampler(len(train_w), cfg.batch_size, 0, rank // cp, world // cp),
                            cfg.batch_size)                         # the cp ranks of a group share their rows
    trainer = Trainer(cfg, model, LMLoss.from_config(cfg, model), log=lambda *_: None)
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        trainer.train_step([next(batches)])
        times.append(time.perf_counter() - t0)
    peak = resident_bytes("VmHWM") - before
    rows = sum(getattr(m.experts, "rows_sent", 0) for m in trainer.moe_layers)
    local = torch.tensor([peak, rows], dtype=torch.float64)
    gathered = [torch.zeros_like(local) for _ in range(world)] if world > 1 else [local]
    if world > 1:
        dist.all_gather(gathered, local)
    if rank == 0:
        step = sorted(times[1:])[len(times[1:]) // 2]                  # median after the first (warm-up) step
        tokens = (cfg.seq_len + 1) * cfg.batch_size * world // cp
        L = model_config.expert_input_size
        n_moe = len(trainer.moe_layers)
        with open(os.path.join(spec["out"], "result.json"), "w") as f:
            json.dump(dict(tokens_per_s=tokens / step, step_s=step,
                           peak_mib_per_rank=[float(g[0]) / 2**20 for g in gathered],
                           # rows sent off-rank (dispatch + combine) per token per MoE layer, float32 elements
                           a2a_bytes_per_token_layer=sum(float(g[1]) for g in gathered) * L * 4 /
                           (tokens * spec["steps"] * n_moe)), f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def launch(world: int, spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
           os.path.abspath(__file__), "--worker", json.dumps(spec)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    with open(os.path.join(spec["out"], "result.json")) as f:
        return json.load(f)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2, help="sequences per rank per step")
    p.add_argument("--cp-only", action="store_true", help="only the context-parallel rows (long sequences)")
    p.add_argument("--cp-seq-len", type=int, default=4095, help="context-parallel rows: --seq-len (rows of +1)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    from common import new_figure, print_table, save, save_figure

    from nemotron3.config import from_preset
    d = from_preset("small").hidden_size
    rows, cp_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [] if args.cp_only else [("MoE", dp, ep, 0) for dp, ep in LAYOUTS] + [("LatentMoE", 1, 2, d // 4)]
        for i, (kind, dp, ep, latent) in enumerate(runs):
            spec = dict(out=os.path.join(tmp, str(i)), steps=args.steps, seq_len=args.seq_len,
                        batch_size=args.batch_size, ep=ep, latent=latent)
            os.makedirs(spec["out"])
            r = launch(dp * ep, spec)
            rows.append(dict(moe=kind, world=dp * ep, dp=dp, ep=ep, tokens_per_s=r["tokens_per_s"],
                             peak_mib=max(r["peak_mib_per_rank"]), a2a_bytes_per_token=r["a2a_bytes_per_token_layer"]))
            print(f"{kind} dp {dp} x ep {ep}: {r['tokens_per_s']:.0f} tok/s", flush=True)
        for dp, cp in CP_LAYOUTS:          # one long row per data-parallel rank, split over the cp ranks
            spec = dict(out=os.path.join(tmp, f"cp{dp}x{cp}"), steps=3, seq_len=args.cp_seq_len, batch_size=1,
                        ep=1, cp=cp, latent=0)
            os.makedirs(spec["out"])
            r = launch(dp * cp, spec)
            cp_rows.append(dict(world=dp * cp, dp=dp, cp=cp, row_tokens=args.cp_seq_len + 1,
                                tokens_per_s=r["tokens_per_s"], peak_mib=max(r["peak_mib_per_rank"])))
            print(f"dp {dp} x cp {cp}: {r['tokens_per_s']:.0f} tok/s", flush=True)
    if rows:
        print_table(rows, ["moe", "world", "dp", "ep", "tokens_per_s", "peak_mib", "a2a_bytes_per_token"])
    print_table(cp_rows, ["world", "dp", "cp", "row_tokens", "tokens_per_s", "peak_mib"])
    if args.cp_only:
        print(f"json: {save('scale_out_cp', {'cp_rows': cp_rows, 'args': vars(args)})}")
        return
    fig, ax = new_figure(3, size=(13, 4))
    moe = [r for r in rows if r["moe"] == "MoE"]
    labels = [f"dp{r['dp']}xep{r['ep']}" for r in moe]
    ax[0].bar(labels, [r["tokens_per_s"] for r in moe])
    ax[0].set_title("training tokens/s (all ranks, 2 CPU cores)")
    ax[1].bar(labels, [r["peak_mib"] for r in moe])
    ax[1].set_title("peak memory per rank (MiB)")
    ep2 = [r for r in rows if r["ep"] == 2 and r["dp"] == 1]
    ax[2].bar([r["moe"] for r in ep2], [r["a2a_bytes_per_token"] for r in ep2])
    ax[2].set_title("all-to-all bytes per token per MoE layer (ep=2)")
    print(f"json: {save('scale_out', {'rows': rows, 'cp_rows': cp_rows, 'args': vars(args)})}   png: {save_figure(fig, 'scale_out')}")


if __name__ == "__main__":
    main()
