"""Scale-out under torchrun on CPU (gloo): FSDP2 (dp=2), expert parallelism (ep=2), context parallelism (cp=2,
packed rows, Mamba B/C split by group and all-gathered), dp=2 x ep=2, dp=2 x tp=2 (tensor parallel) and ep=2 x cp=2
on 4 processes, replicated weights (--no-fsdp), activation checkpointing, CPU offload, a SIGKILL mid-run
(asynchronous saves, --async-save) resumed on another world size and (dp, ep) layout, the export of a
sharded checkpoint, the memory planner on an expert-parallel run, and a Hugging Face-layout model (--model DIR) and
an unsharded run's checkpoint (--resume) read shard by shard into tp 2 and dp 2 x ep 2 models. Oracle: one process
training the same global batch (4 sequences per step) with the tiny preset, which has MTP (2 depths), LatentMoE, the
sequence aux loss and the expert-bias update all on; from_pretrained for the shard-by-shard loads; transformers'
NemotronHForCausalLM for the exported checkpoint.

Tolerances. SGD: loss curve and weights within 1e-5 (only float summation order differs: the ranks' gradient
shards are summed by reduce-scatter instead of in one backward). AdamW divides each coordinate by its own running
RMS, so a coordinate whose gradient is near zero (|g| ~ 1e-9, the size of the summation-order noise) moves by up to
lr whichever sign the noise gives it; those lr-sized differences in router weights flip near-tied top-k choices,
the flipped expert loads change the sign-based bias update, and from then on the last MoE layers route slightly
differently (measured: the whole of layer 7's and MTP's MoE differ, by up to 0.018). So with AdamW the loss curve
stays within 1e-5 and every weight within 2 * sum_t lr_t of the one-process run (each run's Adam step moves a
coordinate by at most about lr_t: |m^| <= sqrt(v^) when beta1^2 <= beta2)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from nemotron3 import NemotronForCausalLM, from_preset
from nemotron3.tokenizer import ByteTokenizer
from nemotron3.train.checkpointing import export_checkpoint
from nemotron3.train.data import document_position_ids
from nemotron3.train.pretrain import TrainConfig, build_data, train
from tests.hf_utils import load_in_hf
from tests.train.test_plan import MEMORY_RUN, planned_peak

COMMON = dict(preset="tiny", seq_len=32, train_tokens=30000, max_steps=6, save_every=2, eval_every=3, lr=0.1,
              optimizer="sgd")
WORKER = os.path.join(os.path.dirname(__file__), "dist_worker.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path),
           MALLOC_MMAP_THRESHOLD_="65536")        # freed blocks go back at once: resident memory tracks tensors


def torchrun(n: int, runs: list[dict], wait: bool = True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), WORKER,
           json.dumps(runs)]
    if not wait:
        return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)          # its own process group: the workers die with it
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def one_process(out, **overrides) -> str:
    train(TrainConfig(out=str(out), batch_size=4, **(COMMON | overrides)), log=lambda *_: None)
    return str(out)


def losses(run):
    return torch.tensor([json.loads(line)["loss"] for line in open(os.path.join(run, "metrics.jsonl"))],
                        dtype=torch.float64)


def weights(run):
    return load_file(os.path.join(run, "final", "model.safetensors"))


def assert_same_run(run, oracle, atol=1e-5):
    torch.testing.assert_close(losses(run), losses(oracle), rtol=0, atol=1e-5)
    a, b = weights(run), weights(oracle)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def assert_loaded_exactly(loaded, model_dir):
    """The weights a sharded run read rank by rank (gathered to OUT/loaded.safetensors) equal from_pretrained's."""
    got = load_file(os.path.join(loaded, "loaded.safetensors"))
    want = NemotronForCausalLM.from_pretrained(model_dir).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_fsdp_expert_parallel_and_replicated_runs_train_the_one_process_model(tmp_path):
    sgd = one_process(tmp_path / "one")
    adam = one_process(tmp_path / "one_adam", optimizer="adamw", lr=3e-3)
    fp4 = one_process(tmp_path / "one_fp4", precision="nvfp4")
    dp2, ep2, dp2_adam, memory, ddp, loaded, ep2_fp4 = (str(tmp_path / n) for n in (
        "dp2", "ep2", "dp2_adam", "memory", "ddp", "loaded", "ep2_fp4"))
    torchrun(2, [dict(MEMORY_RUN, out=memory, ep=2),              # first: its peak is the process's
                 dict(COMMON, out=dp2, batch_size=2),
                 dict(COMMON, out=loaded, model=os.path.join(sgd, "final"), tp=2, load_only=True),
                 dict(COMMON, out=ep2, batch_size=2, ep=2, act_ckpt=True),
                 dict(COMMON, out=dp2_adam, batch_size=2, optimizer="adamw", lr=3e-3, cpu_offload=True),
                 dict(COMMON, out=ddp, batch_size=2, no_fsdp=True),
                 dict(COMMON, out=ep2_fp4, batch_size=2, ep=2, precision="nvfp4")])
    planned = planned_peak(2, 1, 2)                                 # the planner, checked as in test_plan.py
    for rank in (0, 1):
        measured = json.load(open(os.path.join(memory, f"memory_rank{rank}.json")))["peak"]
        assert abs(planned / measured - 1) <= 0.15, (planned, measured)
    assert_same_run(dp2, sgd)
    assert_same_run(ep2, sgd)
    assert_same_run(ddp, sgd)
    assert_loaded_exactly(loaded, os.path.join(sgd, "final"))          # --model DIR read shard by shard under tp 2
    assert not torch.equal(weights(sgd)["lm_head.weight"], load_file(os.path.join(
        sgd, "checkpoints", "step_4", "model.safetensors"))["lm_head.weight"])             # it trained
    rows = json.load(open(os.path.join(ep2, "traffic_rank0.json")))
    assert set(rows) == {"3", "7", "9"} and all(v > 0 for v in rows.values())   # tokens did cross ranks
    biases = [k for k in weights(ep2) if k.endswith("e_score_correction_bias")]
    assert biases and all(weights(ep2)[k].abs().max() > 0 for k in biases)         # the bias update ran
    torch.testing.assert_close(losses(dp2_adam), losses(adam), rtol=0, atol=1e-5)
    travel = sum(json.loads(line)["lr"] for line in open(os.path.join(adam, "metrics.jsonl")))
    a, b = weights(dp2_adam), weights(adam)
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 2 * travel, k
    # NVFP4 experts (per-expert GEMMs) under ep 2: a rank quantizes the activations of its own 2 rows with their own
    # per-tensor scale (amax) and draws its own stochastic-rounding noise, so only a tolerance applies (measured 3e-3)
    torch.testing.assert_close(losses(ep2_fp4), losses(fp4), rtol=0, atol=2e-2)


def test_killed_sharded_run_resumes_on_four_ranks_with_expert_parallelism_and_exports(tmp_path):
    oracle = one_process(tmp_path / "one")
    killed = str(tmp_path / "killed")
    proc = torchrun(2, [dict(COMMON, out=killed, batch_size=2, async_save=True)], wait=False)
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(killed, "checkpoints", "step_2", "trainer_state.json")):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)                                            # torchrun and its 2 workers
    proc.wait()
    assert not os.path.exists(os.path.join(killed, "final"))                        # really killed mid-run
    fresh, from_hf, loaded, tp2, cp2ep2 = (str(tmp_path / n) for n in ("dp2ep2", "from_hf", "loaded", "dp2tp2",
                                                                         "cp2ep2"))
    packed = dict(seq_len=31, no_cross_document=True)        # rows of 32 tokens, split 16 + 16 over cp
    shutil.copytree(oracle, from_hf)                  # the one-process run's step_4 (Hugging Face layout) ...
    for name in ("final", os.path.join("checkpoints", "step_6")):
        shutil.rmtree(os.path.join(from_hf, name))
    torchrun(4, [dict(COMMON, out=loaded, model=os.path.join(oracle, "final"), ep=2, load_only=True),
                 dict(COMMON, out=fresh, batch_size=1, ep=2, async_save=True),
                 dict(COMMON, out=killed, batch_size=1, ep=2, resume=True),
                 dict(COMMON, out=from_hf, batch_size=1, ep=2, resume=True),     # ... resumed sharded, dp 2 x ep 2
                 dict(COMMON, out=tp2, batch_size=2, tp=2),      # dp 2 x tp 2: each tp pair reads the same 2 rows
                 dict(COMMON, out=cp2ep2, batch_size=2, ep=2, cp=2, **packed)])   # ep 2 x cp 2: 2 rows per ep rank
    assert_same_run(fresh, oracle)
    assert_same_run(killed, oracle)
    assert_same_run(from_hf, oracle)
    assert_same_run(tp2, oracle)
    assert_same_run(cp2ep2, one_process(tmp_path / "one_packed", **packed))
    for rank in range(4):                 # 64 query features: split by heads over tp 2, then by FSDP2 over dp 2
        assert json.load(open(os.path.join(tp2, f"shapes_rank{rank}.json")))["q_proj_local"] == [16, 64]
    assert_loaded_exactly(loaded, os.path.join(oracle, "final"))         # --model DIR read shard by shard
    assert [json.loads(line)["step"] for line in open(os.path.join(killed, "metrics.jsonl"))] == list(range(1, 7))

    hf_dir = export_checkpoint(os.path.join(fresh, "checkpoints", "step_6"), str(tmp_path / "hf"))
    ours = NemotronForCausalLM.from_pretrained(hf_dir).eval()
    want = weights(oracle)
    for k, v in load_file(os.path.join(hf_dir, "model.safetensors")).items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=1e-5, msg=k)
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_in_hf(hf_dir)(ids).logits.float(), ours(ids).logits, rtol=1e-4, atol=1e-4)


def test_context_parallel_runs_train_the_one_process_model_with_packed_rows(tmp_path):
    """cp 2 on 2 ranks: each rank holds half of every (packed) row; n_groups=1 (B and C all-gathered, since 1 % 2
    != 0) as well as the tiny preset's n_groups=2 (B and C split by group)."""
    one_group = str(tmp_path / "one_group_model")
    torch.manual_seed(0)
    NemotronForCausalLM(from_preset("tiny", n_groups=1)).save_pretrained(one_group)
    packed = dict(seq_len=31, no_cross_document=True)        # rows of seq_len + 1 = 32 tokens, split 16 + 16
    oracle = one_process(tmp_path / "one", **packed)
    oracle_g1 = one_process(tmp_path / "one_g1", model=one_group, **packed)
    cp2, cp2_g1 = str(tmp_path / "cp2"), str(tmp_path / "cp2_g1")
    torchrun(2, [dict(COMMON, out=cp2, batch_size=4, cp=2, **packed),
                 dict(COMMON, out=cp2_g1, batch_size=4, cp=2, model=one_group, **packed)])
    windows, _ = build_data(TrainConfig(out=str(tmp_path), **(COMMON | packed)), ByteTokenizer())
    ids = torch.stack([windows[i] for i in range(len(windows))])
    assert (document_position_ids(ids, ByteTokenizer().eos_token_id)[:, 1:] == 0).any()    # rows are packed
    assert_same_run(cp2, oracle)
    assert_same_run(cp2_g1, oracle_g1)
