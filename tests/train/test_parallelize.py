"""parallelize.py in one process: activation checkpointing and the checks of a layout. Oracles: the same model
trained without checkpointing (same gradients, same expert loads: recomputation in backward must not count tokens
twice), the eager model for compiled blocks, and torch.nn.utils.clip_grad_norm_ for the norm of plain (unsharded) gradients."""

import copy

import pytest
import torch

from nemotron3 import NemotronForCausalLM, from_preset
from nemotron3.__main__ import main
from nemotron3.train.context_parallel import sequence_slice
from nemotron3.train.lm_loss import LMLoss
from nemotron3.train.parallelize import clip_grad_norm_, parallelize
from nemotron3.train.trainer import Trainer, TrainerConfig


def test_activation_checkpointing_keeps_gradients_and_expert_loads(tmp_path):
    torch.manual_seed(0)
    plain = NemotronForCausalLM(from_preset("tiny")).train()
    ckpt = copy.deepcopy(plain)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    out = {}
    for name, model, act in (("plain", plain, False), ("ckpt", ckpt, True)):
        cfg = TrainerConfig(out=str(tmp_path / name), act_ckpt=act, aux_coeff=1e-4)
        trainer = Trainer(cfg, model, LMLoss.from_config(cfg, model), log=lambda *_: None)
        metrics = trainer.accumulate_gradients([batch])
        out[name] = (metrics, trainer.expert_counts, {n: p.grad.clone() for n, p in model.named_parameters()})
    assert out["plain"][0]["total_loss"] == pytest.approx(out["ckpt"][0]["total_loss"], abs=1e-7)
    for i, counts in out["plain"][1].items():
        assert torch.equal(counts, out["ckpt"][1][i]), i
    assert out["plain"][1][3].sum() == 2 * 40 * 2                           # T * K assignments, counted once
    for n, g in out["plain"][2].items():
        torch.testing.assert_close(out["ckpt"][2][n], g, rtol=1e-5, atol=1e-7, msg=n)


def test_compiled_blocks_give_the_eager_gradients(tmp_path):
    """--compile-blocks: every block runs through torch.compile (dynamo captured graphs) and the gradients equal the
    eager model's. A two-block model (attention, MoE) keeps the compilation short."""
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    eager = NemotronForCausalLM(from_preset("tiny", layers_block_type="*E", num_nextn_predict_layers=0)).train()
    compiled = copy.deepcopy(eager)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    grads = {}
    counters.clear()
    for name, model, comp in (("eager", eager, False), ("compiled", compiled, True)):
        cfg = TrainerConfig(out=str(tmp_path / name), compile_blocks=comp)
        trainer = Trainer(cfg, model, LMLoss.from_config(cfg, model), log=lambda *_: None)
        trainer.accumulate_gradients([{"input_ids": ids, "labels": ids}])
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert counters["stats"]["unique_graphs"] >= 2                        # both blocks were compiled
    for n, g in grads["eager"].items():
        torch.testing.assert_close(grads["compiled"][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_clip_grad_norm_matches_torch_on_plain_gradients():
    a, b = (torch.nn.Linear(5, 3) for _ in range(2))
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 5)
    for m in (a, b):
        (m(x) ** 2).sum().mul(10).backward()
    ours = clip_grad_norm_(list(a.parameters()), 0.5)
    theirs = float(torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5))
    assert ours == pytest.approx(theirs, rel=1e-6) and ours > 0.5               # it did clip
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-8)


def test_bad_layouts_are_rejected_with_the_fix(capsys):
    model = NemotronForCausalLM(from_preset("tiny"))
    with pytest.raises(ValueError, match="--ep 2 does not divide the 1 ranks"):
        parallelize(model, world=1, ep=2)
    with pytest.raises(ValueError, match="drop --no-fsdp"):
        parallelize(model, world=2, ep=2, fsdp=False)
    with pytest.raises(ValueError, match="--tp 2 does not divide the 3 ranks"):
        parallelize(model, world=3, tp=2)
    with pytest.raises(ValueError, match="--tp and --ep together are not supported"):
        parallelize(model, world=4, ep=2, tp=2)
    with pytest.raises(ValueError, match="--tp 2 needs torchrun"):
        parallelize(model, world=2, tp=2, fsdp=False)
    with pytest.raises(ValueError, match="--cp 2 does not divide the 3 ranks; use a cp that divides"):
        parallelize(model, world=3, cp=2)
    with pytest.raises(ValueError, match="--cp 3 does not divide num_key_value_heads=2 .*use a cp that divides it"):
        parallelize(model, world=3, cp=3)
    with pytest.raises(ValueError, match="--tp and --cp together are not supported"):
        parallelize(model, world=4, tp=2, cp=2)
    with pytest.raises(ValueError, match="--cp 2 needs torchrun"):
        parallelize(model, world=2, cp=2, fsdp=False)
    with pytest.raises(ValueError, match="--cp 2 does not divide the rows' length 33 .*--seq-len 33"):
        sequence_slice(torch.zeros(1, 33), 0, 2)
    assert main(["train", "--preset", "tiny", "--cp", "2", "--max-steps", "1"]) == 2     # one process
    assert "--cp 2 does not divide the 1 ranks" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--ep", "0", "--max-steps", "1"]) == 2
    assert "--ep 0 must be >= 1" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--tp", "0", "--max-steps", "1"]) == 2
    assert "--tp 0 must be >= 1" in capsys.readouterr().err
