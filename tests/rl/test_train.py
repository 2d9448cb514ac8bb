"""The GRPO training loop on the shared Trainer. Oracles: the uninterrupted run itself for resume (a run stopped after
a checkpoint, or an async run SIGKILLed with its rollout worker, and resumed must give bit-identical weights and
per-step metrics), the versions the loop pushed (async staleness: every token at most max_age versions old; in
lockstep exactly max(0, step - max_age), read from the per-token versions of the checkpointed buffer and of each
batch), the frozen tensors' values before the run (the routers get no gradient), and hand-written expected messages
for bad command-line input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from nemotron3.__main__ import main as cli
from nemotron3.rl.train import GRPOConfig, train_rl

WORDS = "tests.rl.test_rollout:Words"        # reward = words in the answer: any completion scores
SMALL = dict(preset="tiny", env=WORDS, group_size=2, prompts_per_step=2, max_tokens=6, task_pool=16, lr=1e-3,
             warmup_steps=0, save_every=2, seed=3, keep_overlong=True)   # a random model never stops


class Stop(Exception):
    pass


def stop_at(step):
    """A log that dies (like a killed process) when step `step` is reported, i.e. after step - 1 was saved."""
    def log(line):
        if line.startswith(f"step {step}/"):
            raise Stop
    return log


def metrics(run):
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    timing = ("tokens_per_s", "rollout_s", "wall_s", "rollout_tokens_per_s")
    return [{k: v for k, v in r.items() if k not in timing} for r in rows]


def test_killed_and_resumed_run_equals_the_uninterrupted_run(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train_rl(GRPOConfig(out=a, max_steps=4, **SMALL), log=lambda *_: None)
    with pytest.raises(Stop):
        train_rl(GRPOConfig(out=b, max_steps=4, **SMALL), log=stop_at(3))
    assert metrics(b)[-1]["step"] == 3                      # step 3 was logged, its checkpoint never written
    train_rl(GRPOConfig(out=b, max_steps=4, resume=True, **SMALL), log=lambda *_: None)
    wa, wb = load_file(os.path.join(a, "final", "model.safetensors")), load_file(os.path.join(b, "final",
                                                                                               "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert metrics(a) == metrics(b)
    assert all(r["loss_tokens"] > 0 for r in metrics(a)) and any(r["pg_loss"] != 0 for r in metrics(a))


def test_routers_frozen_and_expert_bias_moving(tmp_path):
    from nemotron3 import NemotronForCausalLM, from_preset
    torch.manual_seed(3)
    start = NemotronForCausalLM(from_preset("tiny")).state_dict()
    out = str(tmp_path / "r")
    train_rl(GRPOConfig(out=out, max_steps=2, **SMALL), log=lambda *_: None)
    end = load_file(os.path.join(out, "final", "model.safetensors"))
    routers = [k for k in end if k.endswith("gate.weight")]
    biases = [k for k in end if k.endswith("e_score_correction_bias") and not k.startswith("mtp")]
    assert routers and all(torch.equal(end[k], start[k]) for k in routers)
    assert any(not torch.equal(end[k], start[k]) for k in biases)          # aux-loss-free balancing stays on
    assert any(not torch.equal(end[k], start[k]) for k in end if "mixer.in_proj" in k)


def test_async_run_trains_on_tokens_at_most_max_age_versions_old(tmp_path):
    out = str(tmp_path / "async")
    train_rl(GRPOConfig(out=out, max_steps=3, async_rollouts=True, max_age=1, **SMALL), log=lambda *_: None)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(0 <= r["max_age"] <= 1 for r in rows)
    assert rows[-1]["max_age"] == 1             # the steps after the first really overlap generation and training


ASYNC = dict(SMALL, async_rollouts=True, max_age=2, max_steps=6)


def cli_flags(settings: dict) -> list[str]:
    flags = []
    for k, v in settings.items():
        flag = "--" + k.replace("_", "-")
        flags += [flag] if v is True else [] if v is False else [flag, str(v)]
    return flags


def test_killed_async_run_resumes_bit_for_bit_within_the_staleness_bound(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train_rl(GRPOConfig(out=full, **ASYNC), log=lambda *_: None)
    # the rollout worker is a child of the run: its own process group lets the kill take both, as a crash would
    proc = subprocess.Popen([sys.executable, "-m", "nemotron3", "rl", "--out", part] + cli_flags(ASYNC),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not os.path.exists(os.path.join(part, "checkpoints", "step_2", "trainer_state.json")):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(part, "final"))                         # really killed mid-run

    # the checkpointed buffer: the groups of the next max_age steps, whole, each token of version max(0, k - 2)
    # for the batch of step k (0-based), i.e. at most max_age versions older than the step that will train on it
    saved = sorted(int(d[5:]) for d in os.listdir(os.path.join(part, "checkpoints")) if d.startswith("step_"))
    P, age = ASYNC["prompts_per_step"], ASYNC["max_age"]
    for c in saved:
        with open(os.path.join(part, "checkpoints", f"step_{c}", "trainer_state.json")) as f:
            state = json.load(f)["data"]["rollouts"]
        assert state["next_group"] == (c + age) * P
        buffer = [t for g in state["buffer"] for t in g]
        assert sorted({t["group"] for t in buffer}) == list(range(c * P, (c + age) * P))
        for t in buffer:
            k = t["group"] // P                                                     # the step that trains on it
            made = [v for v, m in zip(t["versions"], t["loss_mask"]) if m]
            assert made and all(v == max(0, k - age) for v in made) and k - made[0] <= age

    train_rl(GRPOConfig(out=part, resume=True, **ASYNC), log=lambda *_: None)
    wa = load_file(os.path.join(full, "final", "model.safetensors"))
    wb = load_file(os.path.join(part, "final", "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert metrics(full) == metrics(part) and [r["step"] for r in metrics(full)] == list(range(1, 7))
    for r in metrics(full):                  # the batch of metrics row `step` trained version step - 1
        assert r["oldest_version"] == r["newest_version"] == max(0, r["step"] - 1 - age)
        assert r["max_age"] == min(r["step"] - 1, age) and r["loss_tokens"] > 0


@pytest.mark.parametrize("flags, message", [
    (["--env", "nosuch"], "neither a built-in"),
    (["--env", "nosuch_module_xyz:Env"], "cannot import module"),
    (["--env", "math", "--env-weights", "1,2"], "give 1 non-negative numbers"),
    (["--env", "math,math"], "named twice"),
    (["--is-correction", "clip"], "use none, tis or mask"),
    (["--is-bounds", "5,1"], "need 0 <= lo < hi"),
    (["--is-bounds", "x"], "write lo,hi"),
    (["--group-size", "1"], "needs >= 2 samples"),
    (["--grad-accum", "2"], "one micro-batch per step"),
    (["--mtp-train", "sometimes"], "use detached or frozen"),
    (["--inflight-updates"], "needs --async"),
])
def test_bad_flags_are_rejected_with_one_clear_line(tmp_path, capsys, flags, message):
    rc = cli(["rl", "--out", str(tmp_path / "x"), *flags])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_an_async_checkpoint_resumed_without_async_continues_at_its_step():
    """Resuming an --async run's checkpoint without --async: the buffer (the groups of the next max_age steps) is
    regenerated, not skipped, so step c trains on the tasks of step c. Oracle: what a sync run's checkpoint at
    step c (next_group c * prompts, the state sync resume is tested bit-exact on) starts with."""
    from itertools import islice
    from nemotron3 import NemotronForCausalLM, from_preset
    from nemotron3.rl.train import RolloutBatches, load_envs
    from nemotron3.tokenizer import ByteTokenizer
    cfg = GRPOConfig(out="unused", max_steps=6, **SMALL)
    P = cfg.prompts_per_step

    def started(rollouts_state):
        batches = RolloutBatches(cfg, NemotronForCausalLM(from_preset("tiny")), ByteTokenizer(), load_envs(cfg))
        batches.load_state_dict({"step": 2, "pass_rates": None, "rollouts": rollouts_state})
        batches._start()
        return batches.rollouts
    buffer = [[{"group": g}] * cfg.group_size for g in range(2 * P, 4 * P)]       # an async run saved at step 2
    resumed = started({"next_group": 4 * P, "handed_out": True, "buffer": buffer})
    sync = started({"next_group": 2 * P})
    assert resumed.state_dict() == sync.state_dict() == {"next_group": 2 * P}
    assert list(islice(resumed.tasks, 2 * P)) == list(islice(sync.tasks, 2 * P))
