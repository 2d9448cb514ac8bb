"""The Nemotron 3 precision recipe on real models: which layer gets which format, the model still being the same
model (names, parameters, checkpoints), every layer type training in NVFP4, and --precision nvfp4 in the trainer
(statistics logged, exact resume, --explain)."""

import json
import os
import shutil

import torch
from safetensors.torch import load_file

from nemotron3 import NemotronForCausalLM, from_preset
from nemotron3.__main__ import main
from nemotron3.quant import NVFP4Recipe, QuantLinear, apply_recipe, plan
from nemotron3.train.pretrain import TrainConfig, train


def test_super_plan_matches_the_paper():
    with torch.device("meta"):
        model = NemotronForCausalLM(from_preset("super-120b-a12b"))
    layer_formats = {}
    for p in plan(model, NVFP4Recipe()):
        if p.name.startswith("backbone.layers."):
            layer_formats.setdefault(int(p.name.split(".")[2]), set()).add(p.format)
    all_high = [i for i, f in sorted(layer_formats.items()) if f == {"high"}]
    kinds_of = {i: model.backbone.layers[i].kind for i in layer_formats}
    # the last 14 of 88 (Megatron-Bridge: num_layers_at_end_in_bf16=14); before them only attention is all-high
    assert all_high[-14:] == list(range(74, 88))
    assert all(kinds_of[i] == "full_attention" for i in all_high[:-14])
    kinds, mtp = {}, set()
    for p in plan(model, NVFP4Recipe()):
        if p.name.startswith("mtp."):
            mtp.add(p.format)
        elif not p.name.startswith("backbone.layers.") or int(p.name.split(".")[2]) < 74:
            kinds.setdefault(p.kind, set()).add(p.format)
    assert kinds == {"mamba_in": {"nvfp4"}, "mamba_out": {"mxfp8"}, "attention": {"high"}, "experts": {"nvfp4"},
                     "shared_expert": {"nvfp4"}, "latent_proj": {"high"}, "lm_head": {"high"}}
    assert mtp == {"high"}


def test_conversion_keeps_names_parameters_and_outputs_close():
    torch.manual_seed(0)
    model = NemotronForCausalLM(from_preset("tiny"))
    ref = NemotronForCausalLM(from_preset("tiny"))
    ref.load_state_dict(model.state_dict())
    keys, params = list(model.state_dict()), {id(p) for p in model.parameters()}
    quant = apply_recipe(model)
    assert list(model.state_dict()) == keys and {id(p) for p in model.parameters()} == params
    assert isinstance(model.backbone.layers[0].mixer.in_proj, QuantLinear)
    assert model.backbone.layers[3].mixer.experts.linear is quant.modules["backbone.layers.3.mixer.experts"]
    ids = torch.randint(0, 256, (2, 40))
    a, b = model(ids).logits, ref(ids).logits
    assert not torch.equal(a, b) and torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0) > 0.95


def test_every_layer_type_trains_in_nvfp4():
    torch.manual_seed(0)
    model = NemotronForCausalLM(from_preset("tiny"))
    quant = apply_recipe(model, NVFP4Recipe(all_nvfp4=True))
    kinds = {p.kind for p in quant.plan if p.format == "nvfp4"}
    assert kinds == {"mamba_in", "mamba_out", "attention", "experts", "shared_expert", "latent_proj", "mlp", "mtp"}
    quant.monitor(True)
    ids = torch.randint(0, 256, (2, 48))
    out = model(ids, labels=ids, mtp_depths=2)
    (out.loss + sum(out.mtp_losses)).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for n, p in model.named_parameters()
               if "bias" not in n or "e_score" in n), "a parameter got no or a non-finite gradient"
    stats = quant.stats()
    assert set(stats) == set(quant.modules) and all("ftz_grad" in s and "wgrad_zero" in s for s in stats.values())


def _cfg(out, **kw):
    return TrainConfig(out=str(out), precision="nvfp4", max_steps=6, save_every=3, eval_every=3, seq_len=32,
                       batch_size=4, train_tokens=20000, **kw)


def test_nvfp4_training_logs_statistics_and_resumes_exactly(tmp_path):
    train(_cfg(tmp_path / "a"), log=lambda *_: None)
    rows = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert "nvfp4_ftz_act" in rows[2] and "mxfp8_ftz_grad" in rows[2] and "nvfp4_ftz_act" not in rows[0]
    assert 0 < rows[-1]["nvfp4_ftz_act"] < 0.5 and rows[-1]["eval_loss"] < rows[0]["loss"]
    per_layer = [json.loads(line) for line in open(tmp_path / "a" / "quant_stats.jsonl")]
    assert [r["step"] for r in per_layer] == [3, 6]
    assert "backbone.layers.0.mixer.in_proj" in per_layer[0]["layers"]
    # a run stopped at step 3 and resumed gives the same weights (stochastic rounding reseeded per step)
    train(_cfg(tmp_path / "b"), log=lambda *_: None)
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_6")
    shutil.rmtree(tmp_path / "b" / "final")
    train(_cfg(tmp_path / "b", resume=True), log=lambda *_: None)
    a, b = (load_file(os.path.join(tmp_path, r, "final", "model.safetensors")) for r in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ablation_switches_reach_the_layers():
    cfg = TrainConfig(precision="nvfp4", nvfp4_no_rht=True, nvfp4_no_sr=True, nvfp4_no_2d=True,
                      nvfp4_mamba_out="nvfp4", nvfp4_high_last=0.0)
    from nemotron3.train.pretrain import nvfp4_recipe
    model = NemotronForCausalLM(from_preset("tiny"))
    quant = apply_recipe(model, nvfp4_recipe(cfg))
    fmts = {m.fmt for m in quant.modules.values()}
    assert all(not f.rht and not f.stochastic_rounding and not f.weight_tile_2d for f in fmts)
    assert quant.modules["backbone.layers.0.mixer.out_proj"].fmt.format == "nvfp4"
    assert "backbone.layers.7.mixer.experts" in quant.modules          # no high-precision tail


def test_explain_and_bad_flags(capsys):
    assert main(["train", "--precision", "nvfp4", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "backbone.layers.0.mixer.out_proj" in out and "mxfp8" in out and "totals: 8 nvfp4, 3 mxfp8, 26 high" in out
    assert main(["train", "--precision", "nvfp4", "--nvfp4-mamba-out", "fp2"]) == 2
    assert "mamba_out_proj='fp2'" in capsys.readouterr().err
    assert main(["train", "--precision", "fp4"]) == 2
    assert "use fp32, bf16 or nvfp4" in capsys.readouterr().err
