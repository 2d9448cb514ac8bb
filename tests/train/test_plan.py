"""The memory planner (train/plan.py). Oracle: the peak resident memory of real training runs on CPU (the process's
VmHWM above what it held before the model was built, malloc returning freed blocks at once), here for one
process; tests/train/test_distributed.py checks a dp=1 x ep=2 run the same way. Tolerance 15%: the planner models
tensors, not the allocator's slack or the communication library's buffers."""

import json
import os
import subprocess
import sys

import pytest

from nemotron3.__main__ import main
from nemotron3.train.plan import PlanConfig, plan

MEMORY_RUN = dict(preset="small", seq_len=256, train_tokens=60000, batch_size=4, memory_steps=2, optimizer="adamw")
WORKER = os.path.join(os.path.dirname(__file__), "dist_worker.py")


def planned_peak(gpus, dp, ep):
    return plan(PlanConfig(preset="small", gpus=gpus, dp=dp, ep=ep, seq_len=256, micro_batch=4,
                           precision="fp32"))["peak"]


def test_planned_peak_memory_matches_a_measured_one_process_run(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, WORKER, json.dumps([dict(MEMORY_RUN, out=str(tmp_path))])], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.load(open(tmp_path / "memory_rank0.json"))["peak"]
    assert abs(planned_peak(1, 1, 1) / measured - 1) <= 0.15, (planned_peak(1, 1, 1), measured)


def test_plan_command_reports_each_part_and_what_fits(capsys):
    assert main(["plan", "--preset", "nano-30b-a3b", "--gpus", "64", "--dp", "8", "--ep", "8", "--seq-len", "8192",
                 "--act-ckpt"]) == 0
    out = capsys.readouterr().out
    for part in ("parameters", "gradients", "optimizer", "activations", "all_to_all", "peak", "80 GB", "141 GB",
                 "192 GB", "KiB per token"):
        assert part in out, part


def test_expert_parallelism_divides_expert_memory_and_layout_errors_name_the_fix():
    one, eight = (plan(PlanConfig(preset="nano-30b-a3b", gpus=64, dp=64 // ep, ep=ep, seq_len=1024))
                  for ep in (1, 8))
    assert eight["parameters"] == pytest.approx(one["parameters"])      # same sharding degree (64) for every part
    assert eight["all_to_all"] > 0 == one["all_to_all"]
    long, halves = (plan(PlanConfig(preset="nano-30b-a3b", gpus=8 * cp, dp=8, ep=1, cp=cp, seq_len=65536))
                    for cp in (1, 2))
    assert halves["activations"] < 0.51 * long["activations"]         # each cp rank saves half of every row
    assert halves["parameters"] == pytest.approx(long["parameters"] / 2)   # FSDP2 shards over dp x cp
    with pytest.raises(ValueError, match="dp \\* ep \\* tp \\* cp"):
        PlanConfig(gpus=64, dp=8, ep=4).validate()
    with pytest.raises(ValueError, match="does not divide"):
        plan(PlanConfig(preset="nano-30b-a3b", gpus=6, dp=2, ep=3, seq_len=128))
