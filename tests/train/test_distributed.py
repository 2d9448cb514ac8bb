"""torchrun on CPU (gloo). Oracle: one process with the same global batch; the same model comes out (to float
summation order: the two ranks' gradients are averaged instead of summed in one pass)."""

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

ARGS = ["--preset", "tiny", "--seq-len", "32", "--eval-every", "3", "--train-tokens", "30000", "--max-steps", "6",
        "--save-every", "3"]


def test_two_processes_train_the_same_model_as_one(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "nemotron3", "train", "--out", str(tmp_path / "one"),
                          "--batch-size", "4"] + ARGS, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "nemotron3", "train", "--out", str(tmp_path / "two"), "--batch-size", "2"] + ARGS,
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(tmp_path / "one" / "final" / "model.safetensors")
    b = load_file(tmp_path / "two" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert not torch.equal(a["lm_head.weight"], load_file(tmp_path / "one" / "checkpoints" / "step_3" /
                                                          "model.safetensors")["lm_head.weight"])   # it trained
